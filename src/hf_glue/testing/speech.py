"""Tiny speech experts and target data (synthetic tones, no espeak or recordings): seconds on CPU.

Audio classification: a clip is one tone from 8 pitches with a domain-specific timbre; the label is a bit of the
pitch's index, a different bit in each domain (so the domains' rules disagree). CTC: each letter of a transcript
is a tone segment, words are separated by silence; the letter→pitch map is rotated per domain (an "accent"), so an
expert of another domain hears systematically wrong letters.

Models: a tiny wav2vec2 (conv encoder 16x downsampling, hidden 32, 2 layers, 2 heads) at 8 kHz, fine-tuned from
one shared base trained on a mix of the domains.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
import numpy as np
import torch

RATE = 8000
CLS_PITCHES = [250.0, 450.0, 650.0, 850.0, 1050.0, 1250.0, 1450.0, 1650.0]
LETTERS = "abcd"
LETTER_PITCHES = [1000.0, 1600.0, 2200.0, 2800.0]
VOCAB = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: 3 + i for i, c in enumerate(LETTERS)}}


def _tone(freq: float, n: int, domain: int, rate: int, rng: np.random.Generator, amp: float) -> np.ndarray:
    """``n`` samples of a tone with the domain's timbre (0: sine, 1: odd harmonics, 2: even harmonics)."""
    t = np.arange(n) / rate
    phase = 2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)
    x = np.sin(phase)
    if domain % 3 == 1:
        x = x + 0.5 * np.sin(3 * phase)
    elif domain % 3 == 2:
        x = x + 0.5 * np.sin(2 * phase)
    ramp = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / max(1, rate // 1000))  # 1 ms fades
    return amp * x * ramp / np.abs(x).max()


def classification_clips(domain: int, n: int, seed: int, rate: int = RATE) -> list[dict]:
    """Clips of 0.08-0.12 s: one tone of 8 pitches, noise; label = bit ``domain % 3`` of the pitch index."""
    rng = np.random.default_rng(seed * 7919 + domain)
    rows = []
    for _ in range(n):
        index = int(rng.integers(len(CLS_PITCHES)))
        length = int(rng.integers(int(0.08 * rate), int(0.12 * rate)))
        x = _tone(CLS_PITCHES[index], length, domain, rate, rng, rng.uniform(0.3, 0.8))
        x = x + 0.02 * rng.standard_normal(length)
        rows.append({"audio": x.astype(np.float32), "label": (index >> (domain % 3)) & 1})
    return rows


def ctc_clips(domain: int, n: int, seed: int, rate: int = RATE) -> list[dict]:
    """Utterances of two words of 1-2 letters (no letter twice in a row): 30 ms per letter, 5 ms between
    letters, 20 ms of silence between words; letter i sounds at pitch ``(i + domain) % 4``."""
    rng = np.random.default_rng(seed * 104729 + domain)
    letter, gap, space = int(0.03 * rate), int(0.005 * rate), int(0.02 * rate)
    rows = []
    for _ in range(n):
        words = []
        for _ in range(2):
            first = int(rng.integers(len(LETTERS)))
            word = [first]
            if rng.random() < 0.5:
                word.append(int((first + rng.integers(1, len(LETTERS))) % len(LETTERS)))
            words.append(word)
        amp = rng.uniform(0.3, 0.8)
        parts, track = [np.zeros(space)], [np.full(space, VOCAB["<pad>"])]
        for w, word in enumerate(words):
            for k, i in enumerate(word):
                parts.append(_tone(LETTER_PITCHES[(i + domain) % len(LETTERS)], letter, domain, rate, rng, amp))
                track.append(np.full(letter, VOCAB[LETTERS[i]]))
                pause = gap if k + 1 < len(word) else space
                parts.append(np.zeros(pause))
                track.append(np.full(pause, VOCAB["|"] if k + 1 == len(word) and w + 1 < len(words) else 0))
        x = np.concatenate(parts)
        x = x + 0.02 * rng.standard_normal(len(x))
        text = " ".join("".join(LETTERS[i] for i in word) for word in words)
        rows.append({"audio": x.astype(np.float32), "text": text, "track": np.concatenate(track)})
    return rows


def clips_for(task: str):
    return ctc_clips if task == "ctc" else classification_clips


def feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=RATE, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=True)


def processor(folder: Path):
    """A ``Wav2Vec2Processor``: the feature extractor and a character CTC tokenizer (``<pad>`` is the blank)."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2Processor

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(VOCAB))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                     word_delimiter_token="|", bos_token=None, eos_token=None)
    return Wav2Vec2Processor(feature_extractor=feature_extractor(), tokenizer=tokenizer)


def tiny_speech_model(task: str, seed: int):
    """A freshly initialised tiny wav2vec2: CTC head over ``VOCAB`` (``task="ctc"``) or a 2-class classifier."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, Wav2Vec2ForSequenceClassification

    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 32), conv_kernel=(8, 4), conv_stride=(4, 4), conv_bias=True, feat_extract_norm="layer",
        do_stable_layer_norm=True, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0, apply_spec_augment=False,
        pad_token_id=VOCAB["<pad>"], ctc_loss_reduction="mean", classifier_proj_size=16, num_labels=2,
    )
    model = Wav2Vec2ForCTC(config) if task == "ctc" else Wav2Vec2ForSequenceClassification(config)
    return model


def _batch(extractor, tokenizer, rows: list[dict]) -> dict:
    enc = extractor([r["audio"] for r in rows], sampling_rate=RATE, padding=True, return_tensors="pt",
                    return_attention_mask=True)
    if "text" in rows[0]:
        ids = tokenizer([r["text"] for r in rows])["input_ids"]
        labels = torch.full((len(ids), max(map(len, ids))), -100, dtype=torch.long)
        for i, row in enumerate(ids):
            labels[i, : len(row)] = torch.tensor(row)
    else:
        labels = torch.tensor([r["label"] for r in rows])
    return {**enc, "labels": labels}


def _frame_loss(model, batch: dict, rows: list[dict]) -> torch.Tensor:
    """Cross-entropy of each frame's logits against the token sounding at the frame's centre (blank in silence,
    ``|`` between words): the synthetic clips' known alignment, a valid CTC path. Tiny wav2vec2 models trained
    from scratch with the CTC loss sit on its all-blank plateau for thousands of steps; with this they learn in
    tens, and then their CTC loss is low."""
    from ..tasks.audio import frame_count

    logits = model(input_values=batch["input_values"], attention_mask=batch["attention_mask"]).logits
    targets = torch.full(logits.shape[:2], -100, dtype=torch.long)
    stride = int(np.prod(model.config.conv_stride))
    for i, r in enumerate(rows):
        n = frame_count(model.config.to_dict(), len(r["audio"]))
        centres = np.minimum(np.arange(n) * stride + stride // 2, len(r["track"]) - 1)
        targets[i, :n] = torch.as_tensor(r["track"][centres], dtype=torch.long)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_speech(model, extractor, tokenizer, rows: list[dict], steps: int, seed: int, lr: float = 5e-3,
                 batch_size: int = 16):
    """A few steps of AdamW on ``rows`` (plain torch loop: fast and deterministic); CTC models on frame labels."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        chosen = rng.sample(rows, min(batch_size, len(rows)))
        batch = _batch(extractor, tokenizer, chosen)
        loss = _frame_loss(model, batch, chosen) if "track" in chosen[0] else model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def build_speech_experts(root: Path, task: str, n_experts: int = 3, seed: int = 0, base_steps: int = 20,
                         expert_steps: int = 40) -> list[Path]:
    """Save ``n_experts`` tiny wav2vec2 experts under ``root/expert-{d}`` (``task``: ``audio-classification`` or
    ``ctc``), each fine-tuned on domain d from one shared base (saved as ``root/base``), with their feature
    extractor (classification) or ``Wav2Vec2Processor`` (CTC)."""
    root = Path(root)
    make = clips_for(task)
    if task == "ctc":
        saver = processor(root / "vocab")
        extractor, tokenizer = saver.feature_extractor, saver.tokenizer
    else:
        saver = extractor = feature_extractor()
        tokenizer = None
    base = tiny_speech_model(task, seed)
    mixed = [r for d in range(n_experts) for r in make(d, 96, seed + 1)]
    train_speech(base, extractor, tokenizer, mixed, base_steps, seed)
    paths = []
    for d, (model, name) in enumerate([(base, "base")] + [(None, f"expert-{k}") for k in range(n_experts)]):
        if model is None:
            model = train_speech(copy.deepcopy(base), extractor, tokenizer, make(d - 1, 192, seed + 2),
                                 expert_steps, seed + d)
        model.save_pretrained(root / name)
        saver.save_pretrained(root / name)
        if name != "base":
            paths.append(root / name)
    return paths


def write_speech_dataset(folder: Path, task: str, domain: int, n_train: int = 96, n_test: int = 48, seed: int = 0,
                         form: str = "jsonl", rate: int = RATE, sampling_rate_column: bool = False) -> Path:
    """Target data from ``domain``: ``train``/``test`` splits with an ``audio`` column and ``label`` (audio
    classification) or ``text`` (CTC).

    ``form``: ``jsonl`` (plain float arrays; with ``sampling_rate_column`` a ``sampling_rate`` column too) or
    ``wav`` (parquet files with a `datasets` Audio column of embedded PCM WAV bytes, as Hub datasets store audio;
    rows cycle through 16-bit mono, 8-bit mono, 32-bit stereo) or ``audiofolder`` (16-bit WAV files and a
    ``metadata.csv`` per split, `datasets`' AudioFolder layout). ``rate``: the clips' sampling rate."""
    from ..tasks.audio import write_wav

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    make = clips_for(task)
    for split, n, offset in (("train", n_train, 100), ("test", n_test, 200)):
        rows = make(domain, n, seed + offset, rate)
        if form == "jsonl":
            lines = []
            for r in rows:
                row = {k: v for k, v in r.items() if k != "track"}
                row["audio"] = [round(float(v), 5) for v in r["audio"]]
                if sampling_rate_column:
                    row["sampling_rate"] = rate
                lines.append(json.dumps(row) + "\n")
            (folder / f"{split}.jsonl").write_text("".join(lines))
        elif form == "wav":
            _write_audio_parquet(folder / f"{split}.parquet", rows, rate, write_wav)
        elif form == "audiofolder":  # datasets' AudioFolder layout: <split>/<n>.wav and <split>/metadata.csv
            (folder / split).mkdir(exist_ok=True)
            names = [f"{i:04d}.wav" for i in range(len(rows))]
            for name, r in zip(names, rows):
                write_wav(str(folder / split / name), np.asarray(r["audio"], dtype=np.float32), rate)
            other = [k for k in rows[0] if k not in ("audio", "track")]
            lines = ["file_name," + ",".join(other)] + [
                name + "," + ",".join(json.dumps(r[k]) if isinstance(r[k], str) else str(r[k]) for k in other)
                for name, r in zip(names, rows)]
            (folder / split / "metadata.csv").write_text("\n".join(lines) + "\n")
        else:
            raise ValueError(f"unknown form {form!r}")
    return folder


def _write_audio_parquet(path: Path, rows: list[dict], rate: int, write_wav) -> None:
    import io

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = []
    for i, r in enumerate(rows):
        width, channels = [(2, 1), (1, 1), (4, 2)][i % 3]
        buffer = io.BytesIO()
        write_wav(buffer, r["audio"], rate, width=width, channels=channels)
        cells.append({"bytes": buffer.getvalue(), "path": f"{i:05d}.wav"})
    other = {k: [r[k] for r in rows] for k in rows[0] if k not in ("audio", "track")}
    features = datasets.Features({"audio": datasets.Audio(),
                                  **{k: datasets.Value("string" if isinstance(v[0], str) else "int64")
                                     for k, v in other.items()}})
    table = pa.table({"audio": pa.array(cells, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      **other})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features.to_dict()}})})
    pq.write_table(table, path)


def rows_as_arrays(folder: Path, split: str = "test") -> list[dict]:
    """The rows of a ``jsonl`` dataset written by `write_speech_dataset`."""
    return [json.loads(line) for line in (Path(folder) / f"{split}.jsonl").read_text().splitlines()]
