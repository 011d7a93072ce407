"""Tiny experts and target data for tests and the bundled example (hidden 32, 2 layers, seconds on CPU).

Experts are fine-tuned from one shared base on different synthetic domains, so they really differ, and can be
published into a Hugging Face cache layout so ``org/name`` resolves offline through `huggingface_hub`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
N_CUES = 8
N_FILLERS = 10
CUES_PER_TEXT = 3
TEXT_LENGTH = 9


def make_tokenizer(words: Sequence[str]):
    """A word-level tokenizer over ``words`` (whitespace split), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", eos_token="[SEP]", bos_token="[CLS]")


# --- sequence classification: shared cue words whose meaning depends on the domain --------------------------

def classification_vocab(n_domains: int) -> list[str]:
    return [f"c{i}" for i in range(N_CUES)] + [f"d{d}w{i}" for d in range(n_domains) for i in range(N_FILLERS)]


def cue_sign(domain: int, cue: int) -> int:
    """+1/-1: what cue word ``cue`` says about the label in ``domain`` (bit patterns: domains disagree)."""
    return 1 if (cue >> (domain % 3)) & 1 else -1


def classification_rows(domain: int, n: int, seed: int) -> list[dict]:
    """Texts of 3 cue words among domain filler words; label = sign of the domain's cue votes."""
    rng = random.Random(seed * 7919 + domain)
    rows = []
    for _ in range(n):
        cues = [rng.randrange(N_CUES) for _ in range(CUES_PER_TEXT)]
        words = [f"c{c}" for c in cues] + [f"d{domain}w{rng.randrange(N_FILLERS)}"
                                           for _ in range(TEXT_LENGTH - CUES_PER_TEXT)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": int(sum(cue_sign(domain, c) for c in cues) > 0)})
    return rows


# --- causal LM: counting sequences with a domain-specific stride ---------------------------------------------

LM_SYMBOLS = 16


def lm_rows(domain: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed * 104729 + domain)
    stride = 2 * domain + 1
    rows = []
    for _ in range(n):
        x = rng.randrange(LM_SYMBOLS)
        seq = [(x + stride * i) % LM_SYMBOLS for i in range(TEXT_LENGTH + 3)]
        rows.append({"text": " ".join(f"t{s}" for s in seq)})
    return rows


# --- image classification: a bright patch whose position means different things per domain ----------------

IMAGE_SIZE = 16


def image_rows(domain: int, n: int, seed: int) -> list[dict]:
    """16×16 images: tinted noise (domain-specific tint) with a bright 4×4 patch; the label says where the
    patch is, by a domain-specific rule (0: top half, 1: bottom half, 2: left half)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed * 15485863 + domain)
    tint = torch.tensor([[0.2, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.2]][domain % 3]).view(3, 1, 1)
    rows = []
    for _ in range(n):
        img = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 0.3 + tint
        y, x = (int(v) for v in torch.randint(0, IMAGE_SIZE - 4, (2,), generator=gen))
        img[:, y: y + 4, x: x + 4] = 1.0
        cy, cx = y + 2, x + 2
        label = [cy < IMAGE_SIZE // 2, cy >= IMAGE_SIZE // 2, cx < IMAGE_SIZE // 2][domain % 3]
        pixels = (img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        rows.append({"image": Image.fromarray(pixels), "label": int(label)})
    return rows


def image_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3)


# --- building and training -----------------------------------------------------------------------------------

def rows_for(task: str):
    """The synthetic-row generator of a task (``vit``, ``resnet`` and ``image-classification``: images)."""
    return {"sequence-classification": classification_rows, "causal-lm": lm_rows}.get(task, image_rows)


def tiny_model(task: str, vocab_size: int, seed: int, dtype: torch.dtype = torch.float32):
    """A freshly initialised tiny model (hidden 32, 2 layers) for ``task``."""
    torch.manual_seed(seed)
    if task == "sequence-classification":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config).to(dtype)
    if task == "causal-lm":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                            bos_token_id=2, eos_token_id=3, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)
        return GPT2LMHeadModel(config).to(dtype)
    if task in ("vit", "image-classification"):
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        return ViTForImageClassification(config).to(dtype)
    if task == "resnet":
        from transformers import ResNetConfig, ResNetForImageClassification

        config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                              layer_type="basic", num_labels=2)
        return ResNetForImageClassification(config).to(dtype)
    raise ValueError(f"no tiny model for task {task!r}")


def train(model, tokenizer, rows: list[dict], task: str, steps: int, seed: int, lr: float = 3e-3,
          batch_size: int = 32):
    """A few steps of AdamW on ``rows`` (plain torch loop: fast and deterministic)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = rng.sample(rows, min(batch_size, len(rows)))
        if "image" in batch[0]:
            enc = tokenizer([r["image"] for r in batch], return_tensors="pt")
        else:
            enc = tokenizer([r["text"] for r in batch], return_tensors="pt", padding=True)
        if "label" in batch[0]:
            labels = torch.tensor([r["label"] for r in batch])
        else:  # causal LM: predict every real token
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out = model(**enc, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    return model


def build_experts(
    root: Path,
    task: str = "sequence-classification",
    n_experts: int = 3,
    base_steps: int = 30,
    expert_steps: int = 120,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """Save ``n_experts`` experts under ``root/expert-{d}``: one shared base (saved as ``root/base``), each
    fine-tuned on domain d.

    ``task``: sequence-classification (BERT), causal-lm (GPT-2), vit or resnet (image classification).
    """
    root = Path(root)
    make_rows = rows_for(task)
    if make_rows is classification_rows:
        tokenizer = make_tokenizer(classification_vocab(n_experts))
    elif make_rows is lm_rows:
        tokenizer = make_tokenizer([f"t{i}" for i in range(LM_SYMBOLS)])
    else:
        tokenizer = image_processor()
    base = tiny_model(task, len(tokenizer) if make_rows is not image_rows else 0, seed)
    mixed = [r for d in range(n_experts) for r in make_rows(d, 200, seed + 1)]
    train(base, tokenizer, mixed, task, base_steps, seed)
    base.to(dtype).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base.to(torch.float32)
    paths = []
    for d in range(n_experts):
        expert = train(copy.deepcopy(base), tokenizer, make_rows(d, 400, seed + 2), task, expert_steps, seed + d)
        path = root / f"expert-{d}"
        expert.to(dtype).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def build_adapters(
    root: Path,
    n_experts: int = 3,
    base_steps: int = 30,
    expert_steps: int = 120,
    seed: int = 0,
    base_name: Optional[str] = None,
    rank: int = 4,
) -> tuple[Path, list[Path]]:
    """Save a tiny BERT base under ``root/base`` and ``n_experts`` PEFT LoRA adapters of it under
    ``root/lora-{d}``, each trained on domain d (query/value/dense factors plus its own classification head, as
    ``modules_to_save``). Ranks differ across adapters (``rank``, ``rank + 2``, ...). ``base_name``: the
    ``base_model_name_or_path`` the adapters record (default: the base folder)."""
    from peft import LoraConfig, get_peft_model

    root = Path(root)
    tokenizer = make_tokenizer(classification_vocab(n_experts))
    base = tiny_model("sequence-classification", len(tokenizer), seed)
    mixed = [r for d in range(n_experts) for r in classification_rows(d, 200, seed + 1)]
    train(base, tokenizer, mixed, "sequence-classification", base_steps, seed)
    base_path = root / "base"
    base.save_pretrained(base_path)
    tokenizer.save_pretrained(base_path)
    paths = []
    for d in range(n_experts):
        torch.manual_seed(seed + 10 + d)
        config = LoraConfig(task_type="SEQ_CLS", r=rank + 2 * (d % 2), lora_alpha=2 * rank,
                            target_modules=["query", "value"] + (["dense"] if d % 2 else []), lora_dropout=0.0)
        model = get_peft_model(copy.deepcopy(base), config)
        train(model, tokenizer, classification_rows(d, 400, seed + 2), "sequence-classification", expert_steps,
              seed + d)
        path = root / f"lora-{d}"
        model.save_pretrained(path)
        adapter_config = json.loads((path / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = base_name or str(base_path)
        (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        paths.append(path)
    return base_path, paths


def write_dataset(folder: Path, task: str, domain: int, n_train: int = 256, n_test: int = 128, seed: int = 0,
                  mix: Optional[Sequence[int]] = None) -> Path:
    """Target data from ``domain`` (or an even mix of ``mix`` domains): ``train.jsonl`` / ``test.jsonl``, or for
    images an imagefolder layout (``train/<label>/*.png``) that `datasets` loads with image and label columns."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    make_rows = rows_for(task)
    domains = list(mix) if mix else [domain]
    for split, n, offset in (("train", n_train, 100), ("test", n_test, 200)):
        rows = [r for d in domains for r in make_rows(d, n // len(domains), seed + offset)]
        random.Random(seed).shuffle(rows)
        if make_rows is image_rows:
            for i, row in enumerate(rows):
                (folder / split / str(row["label"])).mkdir(parents=True, exist_ok=True)
                row["image"].save(folder / split / str(row["label"]) / f"{i:05d}.png")
        else:
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def publish_to_cache(folder: Path, repo_id: str, cache_dir: Path, repo_type: str = "model") -> str:
    """Copy ``folder`` into a Hugging Face cache as ``repo_id`` at a content-derived commit sha; returns the sha.

    Afterwards ``snapshot_download(repo_id)`` resolves it with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE=cache_dir``.
    """
    folder, cache_dir = Path(folder), Path(cache_dir)
    digest = hashlib.sha1()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f.relative_to(folder).as_posix().encode())
        digest.update(f.read_bytes())
    sha = digest.hexdigest()
    repo_dir = cache_dir / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / sha
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    return sha


# --- hard cases for the search (scripts/hard_cases.py): weighted mixtures and near-duplicate experts ---------

def write_mixture_dataset(folder: Path, task: str, shares: dict[int, float], n_train: int = 256,
                          n_test: int = 256, seed: int = 0) -> Path:
    """Text target data (``train.jsonl`` / ``test.jsonl``) drawn from several domains in the given proportions
    (``{domain: share}``, e.g. ``{0: 0.7, 1: 0.3}``): a target no single expert covers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    make_rows = rows_for(task)
    total = sum(shares.values())
    for split, n, offset in (("train", n_train, 100), ("test", n_test, 200)):
        rows = [r for d, share in shares.items() for r in make_rows(d, round(n * share / total), seed + offset)]
        random.Random(seed).shuffle(rows)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def perturbed_copy(source: Path, dest: Path, scale: float = 0.01, seed: int = 0) -> Path:
    """A near-duplicate of the saved model in ``source``, written to ``dest``: every floating tensor plus Gaussian
    noise of ``scale`` times that tensor's standard deviation (the same recipe re-run, as it were)."""
    from safetensors.torch import load_file, save_file

    source, dest = Path(source), Path(dest)
    shutil.copytree(source, dest, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(source / "model.safetensors")
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() > 1:
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * float(t.float().std()) * scale
            tensors[name] = (t.float() + noise).to(t.dtype)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest
