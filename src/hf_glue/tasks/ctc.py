"""Speech recognition with CTC (wav2vec2 / HuBERT family): the experts' processor; WER as the metric.

Columns: the audio (``audio``, ``speech``, ... or ``--audio-column``; see `tasks.audio` for the forms read) and the
transcript (``text``, ``sentence``, ``transcription``, ``transcript`` or ``--text-column``), tokenised by the
experts' CTC tokenizer (``Wav2Vec2CTCTokenizer``: characters, ``|`` between words).

The search's sums (exact across processes, whichever way a batch is split):

- ``loss_sum``: the CTC negative log-likelihood of every utterance (``F.ctc_loss(reduction="none")`` over each
  utterance's own frames, blank = the config's ``pad_token_id``), what transformers' ``ctc_loss_reduction="sum"``
  gives; ``count``: the target tokens (characters and word delimiters). So ``loss`` is the NLL per target token,
  on the scale of transformers' ``"mean"`` reduction (each utterance's NLL over its length, averaged), and equal
  to it when all transcripts are as long.
- ``word_errors`` / ``words`` and ``char_errors`` / ``chars``: greedy CTC decoding (argmax per frame over the
  utterance's own frames, repeats collapsed, blanks dropped), words split at the tokenizer's word delimiter, and
  the token-level edit distances to the reference: corpus WER and CER (characters of the words joined by one
  delimiter, as in the ``wer`` metric).

Frame lengths: the model's ``_get_feat_extract_output_lengths`` from the experts' config (``conv_kernel``,
``conv_stride``, adapter layers), applied in ``preprocess`` to each clip's sample count; the collator puts them in
the batch as ``frame_lengths`` with the blank and delimiter ids (``ctc_tokens``): keys ``model_inputs`` and the
Trainer's collator strip.

``preprocess`` checks every row before the search (`tasks.audio`: rates, files and lengths from headers, no
decoding) and tokenises every transcript: a transcript its clip is too short to spell is refused (so the loss is
finite), and so are transcripts whose characters the tokenizer lacks (more than 1% of the target tokens, or every
letter of one case, as with lower-case text for an upper-case vocabulary): they would all become ``<unk>``.

Experts whose feature extractor makes no attention mask (wav2vec2-base, HuBERT-base: ``feat_extract_norm="group"``,
``return_attention_mask=False``) read each batch's zero padding as signal: an utterance's logits, and so its loss
and WER, depend on the lengths of the utterances batched with it (as in transformers' own batched evaluation of
such models); hf-glue batches as they are and logs a note when the clips differ in length.

The Trainer (``--finetune-epochs``) trains with the model's own loss and scores with the ``wer`` metric on its
gathered argmax ids: it decodes every frame of the padded batch (it has no frame lengths), as transformers'
speech-recognition examples do.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Sequence

import numpy as np

import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..errors import GlueError
from ..metrics.edit_distance import edit_distance
from .audio import AUDIO_COLUMNS, AudioReader, check_clip, encode, pad, warn_if_unmasked
from .base import Task, pick_column, register_task, wide_sum
from .data import source_row

TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript")
#: batch keys only ``batch_stats`` reads (never model inputs)
STATS_KEYS = ("frame_lengths", "ctc_tokens")
#: the share of target tokens that may be ``<unk>`` (characters the tokenizer lacks) before transcripts are refused
UNK_TOLERANCE = 0.01


def frames_needed(ids: Sequence[int]) -> int:
    """The fewest CTC frames that spell ``ids``: one per token, and a blank between repeats."""
    return len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))


def check_transcripts(dataset, column: str, tokenizer, counts: np.ndarray, frames: np.ndarray, where: str,
                      rate: int, zero_infinity: bool) -> None:
    """Tokenise every transcript: refuse (naming the row) one its clip is too short to spell, unless
    ``zero_infinity``, and refuse characters the tokenizer lacks (`check_vocabulary`)."""
    unk, chars, unknown, tokens, start = tokenizer.unk_token_id, Counter(), 0, 0, 0
    for batch in dataset.select_columns([column]).iter(batch_size=1024):
        texts = batch[column]
        for row, (text, ids) in enumerate(zip(texts, tokenizer(texts)["input_ids"]), start):
            chars.update(text)
            tokens, unknown = tokens + len(ids), unknown + ids.count(unk)
            needed, n = frames_needed(ids), int(frames[row])
            if 0 <= n < needed and not zero_infinity:
                raise GlueError(f"{where}, row {source_row(dataset, row) + 1}: the transcript {text[:60]!r} (column {column!r}) needs at "
                                f"least {needed} CTC frames, but its clip ({counts[row]} samples, "
                                f"{counts[row] / rate:.2f} s) makes {n}; drop such rows (or set ctc_zero_infinity "
                                "in the experts' config to score them as 0).")
        start += len(texts)
    if unk is not None and unknown:
        check_vocabulary(tokenizer, chars, unknown, tokens, where, column)


def check_vocabulary(tokenizer, chars: Counter, unknown: int, tokens: int, where: str, column: str) -> None:
    """Refuse transcripts whose characters the tokenizer lacks (they become ``<unk>``): more than
    `UNK_TOLERANCE` of the target tokens, or every letter of one case (lower-case text, upper-case vocabulary),
    naming the most frequent and saying whether the other case is in the vocabulary."""
    unk = tokenizer.unk_token_id

    def known(text: str) -> bool:
        return unk not in tokenizer(text)["input_ids"]

    missing = {c: n for c, n in chars.most_common() if not known(c)}
    cases = [[c for c in chars if unicodedata.category(c) == case] for case in ("Ll", "Lu")]
    if unknown <= UNK_TOLERANCE * tokens and not any(letters and all(c in missing for c in letters)
                                                      for letters in cases):
        return
    shown = ", ".join(f"{c!r} ({n}x)" for c, n in list(missing.items())[:8])
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    swapped = [c for c in missing if c.swapcase() != c and known(c.swapcase())]
    if swapped:
        upper = sum(missing[c] for c in swapped if c.islower()) >= sum(missing[c] for c in swapped if c.isupper())
        case = "upper" if upper else "lower"
        advice = (f"{case.capitalize()}-casing the column would cover {len(swapped)} of these {len(missing)} "
                  f"characters (the vocabulary has them in {case} case): map it with str.{case}() first"
                  + ("; map or drop the others." if len(swapped) < len(missing) else "."))
    else:
        advice = ("The vocabulary lacks them in the other case too: normalise the transcripts to its characters, or "
                  "pick experts whose vocabulary covers them.")
    raise GlueError(f"{where}: {unknown} of the {tokens} target tokens ({unknown / max(tokens, 1):.1%}) in column "
                    f"{column!r} are characters missing from the experts' CTC tokenizer vocabulary, which would all "
                    f"become {tokenizer.unk_token!r}: {shown or '(none alone: in context only)'}{more}. {advice}")


def greedy_ids(frame_ids: Sequence[int], blank: int) -> list[int]:
    """Greedy CTC decoding of per-frame argmax ids: repeats collapsed, then blanks (and padding < 0) dropped."""
    out, previous = [], None
    for i in frame_ids:
        if i != previous and i != blank and i >= 0:
            out.append(i)
        previous = i
    return out


def split_words(ids: Sequence[int], delimiter: int) -> list[tuple[int, ...]]:
    """Token ids split into words at ``delimiter`` (empty words, from repeated or edge delimiters, dropped)."""
    words, word = [], []
    for i in ids:
        if i == delimiter:
            if word:
                words.append(tuple(word))
            word = []
        else:
            word.append(i)
    if word:
        words.append(tuple(word))
    return words


def error_counts(hypothesis: Sequence[int], reference: Sequence[int], delimiter: int) -> tuple[int, int, int, int]:
    """(word errors, reference words, token errors, reference tokens) of decoded ids against reference ids."""
    hyp_words, ref_words = split_words(hypothesis, delimiter), split_words(reference, delimiter)

    def joined(words):
        return [t for k, w in enumerate(words) for t in ((delimiter,) if k else ()) + w]

    hyp_chars, ref_chars = joined(hyp_words), joined(ref_words)
    return (edit_distance(ref_words, hyp_words), len(ref_words), edit_distance(ref_chars, hyp_chars),
            len(ref_chars))


@register_task
class CTC(Task):
    name = "ctc"
    pretty_name = "Speech recognition (CTC)"
    auto_model = "AutoModelForCTC"
    pipeline_tag = "automatic-speech-recognition"
    architecture_suffixes = ("ForCTC",)
    primary_metric = "wer"
    greater_is_better = False
    #: the Trainer's metrics decode padded frames too (it has no frame lengths): before/after use the task's sums
    trainer_metrics_exact = False

    def supports(self, config: dict) -> bool:
        """Raw-waveform models with a convolutional feature encoder (wav2vec2, HuBERT, WavLM, Data2VecAudio, SEW,
        UniSpeech): their frame lengths follow from ``conv_kernel``/``conv_stride``."""
        return super().supports(config) and bool(config.get("conv_kernel")) and bool(config.get("conv_stride"))

    def load_processor(self, path, trust_remote_code=False):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if getattr(processor, "tokenizer", None) is None or getattr(processor, "feature_extractor", None) is None:
            raise GlueError(f"the experts' processor ({type(processor).__name__}) lacks a feature extractor or a CTC "
                            "tokenizer: a CTC expert ships both (preprocessor_config.json or processor_config.json, "
                            "and vocab.json with tokenizer_config.json).")
        return processor

    def resolve_columns(self, column_names: Sequence[str], data: DataConfig) -> dict[str, str]:
        return {
            "audio": pick_column("audio", data.audio_column, AUDIO_COLUMNS, column_names, "--audio-column"),
            "text": pick_column("text", data.text_column, TEXT_COLUMNS, column_names, "--text-column"),
        }

    def preprocess(self, dataset, processor, columns, data: DataConfig, model_config: dict):
        tokenizer, extractor = processor.tokenizer, processor.feature_extractor
        blank, vocab_size = model_config.get("pad_token_id"), model_config.get("vocab_size")
        if blank is None or tokenizer.pad_token_id != blank:
            raise GlueError(f"the experts' config has pad_token_id {blank!r} (the CTC blank), but their tokenizer's "
                            f"pad token id is {tokenizer.pad_token_id!r}; they must agree.")
        if vocab_size is not None and len(tokenizer) > vocab_size:
            raise GlueError(f"the experts' tokenizer has {len(tokenizer)} tokens, more than the {vocab_size} outputs "
                            "of their CTC head.")
        if extractor.model_input_names[0] != "input_values":
            raise GlueError(f"the ctc task reads raw waveforms (input_values); the experts' feature extractor "
                            f"({type(extractor).__name__}) makes {extractor.model_input_names[0]}.")
        where = f"dataset {data.dataset!r}" + (f", split {str(dataset.split)!r}" if dataset.split else "")
        reader = AudioReader(dataset, columns["audio"], extractor.sampling_rate, where)
        text_col = columns["text"]
        zero_infinity = bool(model_config.get("ctc_zero_infinity", False))
        counts, frames = reader.check_rows(model_config)  # not None: `supports` asks for a conv encoder
        check_transcripts(dataset, text_col, tokenizer, counts, frames, where, reader.rate, zero_infinity)
        warn_if_unmasked(extractor, counts, frames)

        def transform(rows):  # lazily, batch by batch: audio is decoded only when used
            values = encode(extractor, reader.read(rows))
            labels = tokenizer(list(rows[text_col]))["input_ids"]
            frames = []
            for text, x, ids in zip(rows[text_col], values, labels):
                n = check_clip(len(x), model_config, where, reader.rate)
                needed = frames_needed(ids)
                if n < needed and not zero_infinity:
                    raise GlueError(f"{where}: the transcript {text[:60]!r} needs at least {needed} CTC frames, but "
                                    f"its clip ({len(x)} samples, {len(x) / reader.rate:.2f} s) makes {n}; drop such "
                                    "rows (or set ctc_zero_infinity in the experts' config to score them as 0).")
                frames.append(n)
            return {"input_values": values, "labels": labels, "frames": frames}

        return reader.dataset.select_columns(reader.columns() + [text_col]).with_transform(transform)

    def collator(self, processor):
        extractor, tokenizer = processor.feature_extractor, processor.tokenizer
        delimiter = getattr(tokenizer, "word_delimiter_token_id", None)
        special = [tokenizer.pad_token_id, -1 if delimiter is None else delimiter]

        def collate(rows):
            batch = pad(extractor, [r["input_values"] for r in rows])
            longest = max(len(r["labels"]) for r in rows)
            labels = torch.full((len(rows), longest), -100, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, : len(r["labels"])] = torch.as_tensor(r["labels"], dtype=torch.long)
            batch["labels"] = labels
            batch["frame_lengths"] = torch.tensor([int(r["frames"]) for r in rows], dtype=torch.long)
            batch["ctc_tokens"] = torch.tensor([special] * len(rows), dtype=torch.long)
            return batch

        return collate

    def model_inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k != "labels" and k not in STATS_KEYS}

    def head_module(self, model):
        return None  # per-frame token outputs, no class head: LogME does not apply

    def batch_stats(self, outputs, batch):
        logits = outputs.logits.float()
        labels, frames = batch["labels"], batch["frame_lengths"].to(logits.device).clamp(max=logits.shape[1])
        blank, delimiter = (int(v) for v in batch["ctc_tokens"][0].tolist())
        mask = (labels >= 0) & (labels != blank)  # as transformers: padding and blanks are not targets
        target_lengths = mask.sum(-1)
        log_probs = F.log_softmax(logits, dim=-1).transpose(0, 1)  # [T, B, V]
        with torch.backends.cudnn.flags(enabled=False):  # as transformers: cuDNN's CTC is nondeterministic
            # zero_infinity: an unspellable utterance was refused in preprocess (or the config zeroes it anyway)
            losses = F.ctc_loss(log_probs, labels.masked_select(mask), frames, target_lengths, blank=blank,
                                reduction="none", zero_infinity=True)
        counts = [0, 0, 0, 0]
        predicted = logits.argmax(-1).tolist()
        for row, n, ref in zip(predicted, frames.tolist(), labels.tolist()):
            hyp = greedy_ids(row[:n], blank)
            for k, c in enumerate(error_counts(hyp, [t for t in ref if t >= 0 and t != blank], delimiter)):
                counts[k] += c
        word_errors, words, char_errors, chars = (torch.tensor(c, dtype=torch.float64, device=logits.device)
                                                  for c in counts)
        return {"loss_sum": wide_sum(losses), "count": wide_sum(target_lengths), "word_errors": word_errors,
                "words": words, "char_errors": char_errors, "chars": chars}

    def finalize(self, sums):
        return {"loss": sums["loss_sum"] / max(sums["count"], 1.0),
                "wer": sums["word_errors"] / max(sums["words"], 1.0),
                "cer": sums["char_errors"] / max(sums["chars"], 1.0)}

    # --- the Trainer (--finetune-epochs) ------------------------------------------------------------------------

    def trainer_collator(self, processor):
        collate = self.collator(processor)

        def trainer_collate(rows):  # the Trainer passes every key to the model
            return {k: v for k, v in collate(rows).items() if k not in STATS_KEYS}

        return trainer_collate

    def preprocess_logits_for_metrics(self):
        def argmax(logits, labels):  # keep [B, T] ids, not [B, T, V] logits, for the whole held-out split
            return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)

        return argmax

    def compute_metrics(self, model_config: dict, processor):
        """WER and CER (the ``wer`` metric) of greedy decoding of the Trainer's gathered predictions (argmax ids,
        or logits), padding (-100) dropped."""
        import numpy as np

        from ..metrics import load_metric

        metric, tokenizer = load_metric("wer"), processor.tokenizer
        blank = tokenizer.pad_token_id
        delimiter = getattr(tokenizer, "word_delimiter_token_id", None)

        def text(ids) -> str:
            words = split_words(ids, -1 if delimiter is None else delimiter)
            return " ".join("".join(tokenizer.convert_ids_to_tokens(list(w))) for w in words)

        def compute(eval_pred):
            predictions, labels = eval_pred.predictions, eval_pred.label_ids
            predictions = predictions[0] if isinstance(predictions, tuple) else predictions
            predictions = np.asarray(predictions)
            if predictions.ndim == 3:  # logits: no preprocess_logits_for_metrics was applied
                padded = (predictions == -100).all(-1)
                predictions = np.where(padded, -100, predictions.argmax(-1))
            hyps = [text(greedy_ids(row.tolist(), blank)) for row in predictions]
            refs = [text([t for t in row.tolist() if t >= 0]) for row in np.asarray(labels)]
            return metric.compute(predictions=hyps, references=refs)

        return compute
