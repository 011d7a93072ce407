"""Tiny experts and target data for the token-classification and seq2seq tasks (seconds on CPU).

Token classification (BERT, hidden 32, 2 layers, word-level tokenizer): sentences of domain filler words with two
entities, each a shared cue word (``c0``..``c7``) optionally followed by a continuation word (``x0``..``x3``). The
entity type a cue word marks depends on the domain (cue ``c`` is ``TYPES[(c + d) % 3]`` in domain ``d``), so the
experts disagree on every cue.

Seq2seq (BART, d_model 32, 2+2 layers, a word-level tokenizer that appends its end-of-sequence token): sources
are 4-6 symbols ``s0``..``s11``; each domain applies its own deterministic transformation (domain 0: reverse;
1: shift every symbol by 3; 2: reverse and shift by 7; ...).

Both fine-tune every expert from one shared base trained on a mix of the domains.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import SPECIALS, make_tokenizer

# --- token classification ------------------------------------------------------------------------------------

TYPES = ("PER", "LOC", "ORG")
NER_TAGS = ["O"] + [f"{p}-{t}" for t in TYPES for p in ("B", "I")]
NER_CUES = 8
NER_CONTINUATIONS = 4
NER_FILLERS = 10
NER_LENGTH = 9


def ner_vocab(n_domains: int) -> list[str]:
    return ([f"c{i}" for i in range(NER_CUES)] + [f"x{i}" for i in range(NER_CONTINUATIONS)]
            + [f"d{d}w{i}" for d in range(n_domains) for i in range(NER_FILLERS)])


def entity_type(domain: int, cue: int) -> str:
    return TYPES[(cue + domain) % len(TYPES)]


def ner_rows(domain: int, n: int, seed: int) -> list[dict]:
    """Rows ``{"tokens": [...], "ner_tags": [...]}`` (IOB2 tag names) of ``domain``."""
    rng = random.Random(seed * 6151 + domain)
    rows = []
    for _ in range(n):
        spans = []
        for _ in range(2):
            cue = rng.randrange(NER_CUES)
            kind = entity_type(domain, cue)
            span = [(f"c{cue}", f"B-{kind}")]
            if rng.random() < 0.5:
                span.append((f"x{rng.randrange(NER_CONTINUATIONS)}", f"I-{kind}"))
            spans.append(span)
        fillers = NER_LENGTH - sum(len(s) for s in spans)
        pieces = [[(f"d{domain}w{rng.randrange(NER_FILLERS)}", "O")] for _ in range(fillers)]
        # entities never touch (a filler between them), so each B- starts a separate, unambiguous entity
        first = rng.randrange(0, fillers - 1)
        second = rng.randrange(first + 1, fillers)
        words = [w for piece in pieces[:first] for w in piece] + spans[0] + \
            [w for piece in pieces[first:second] for w in piece] + spans[1] + \
            [w for piece in pieces[second:] for w in piece]
        rows.append({"tokens": [w for w, _ in words], "ner_tags": [t for _, t in words]})
    return rows


def tiny_token_classifier(vocab_size: int, seed: int):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(NER_TAGS),
                        id2label=dict(enumerate(NER_TAGS)), label2id={t: i for i, t in enumerate(NER_TAGS)},
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForTokenClassification(config)


def _ner_batch(tokenizer, rows: list[dict]) -> dict:
    from hf_glue.tasks.token_classification import align_labels

    enc = tokenizer([r["tokens"] for r in rows], is_split_into_words=True, padding=True, return_tensors="pt")
    to_id = {t: i for i, t in enumerate(NER_TAGS)}
    enc["labels"] = torch.tensor([align_labels(enc.word_ids(i), [to_id[t] for t in r["ner_tags"]])
                                  for i, r in enumerate(rows)])
    return enc


def _seq2seq_batch(tokenizer, rows: list[dict]) -> dict:
    enc = tokenizer([r["source"] for r in rows], text_target=[r["target"] for r in rows], padding=True,
                    return_tensors="pt")
    enc["labels"] = enc["labels"].masked_fill(enc["labels"] == tokenizer.pad_token_id, -100)
    return enc


def _train(model, make_batch, rows: list[dict], steps: int, seed: int, lr: float = 3e-3, batch_size: int = 32):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        out = model(**make_batch(rng.sample(rows, min(batch_size, len(rows)))))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    return model


def _build(root: Path, tokenizer, base, make_rows, make_batch, n_experts: int, base_steps: int,
           expert_steps: int, seed: int, lr: float) -> list[Path]:
    root = Path(root)
    mixed = [r for d in range(n_experts) for r in make_rows(d, 200, seed + 1)]
    _train(base, lambda rows: make_batch(tokenizer, rows), mixed, base_steps, seed, lr)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    paths = []
    for d in range(n_experts):
        expert = _train(copy.deepcopy(base), lambda rows: make_batch(tokenizer, rows), make_rows(d, 400, seed + 2),
                        expert_steps, seed + d, lr)
        path = root / f"expert-{d}"
        expert.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def build_token_classification_experts(root: Path, n_experts: int = 3, base_steps: int = 20,
                                       expert_steps: int = 80, seed: int = 0) -> list[Path]:
    """``n_experts`` tiny BERT NER experts under ``root/expert-{d}`` (and their base under ``root/base``)."""
    tokenizer = make_tokenizer(ner_vocab(n_experts))
    base = tiny_token_classifier(len(tokenizer), seed)
    return _build(root, tokenizer, base, ner_rows, _ner_batch, n_experts, base_steps, expert_steps, seed, 3e-3)


# --- seq2seq -------------------------------------------------------------------------------------------------

SYMBOLS = 12
OFFSETS = (0, 3, 7, 5, 9, 1)


def transform(domain: int, symbols: Sequence[int]) -> list[int]:
    """Domain ``d``'s rule: reverse when ``d`` is even, then shift every symbol by ``OFFSETS[d]``."""
    order = list(reversed(symbols)) if domain % 2 == 0 else list(symbols)
    return [(s + OFFSETS[domain % len(OFFSETS)]) % SYMBOLS for s in order]


def seq2seq_rows(domain: int, n: int, seed: int) -> list[dict]:
    """Rows ``{"source": "s3 s0 s7 ...", "target": ...}`` of ``domain``."""
    rng = random.Random(seed * 7727 + domain)
    rows = []
    for _ in range(n):
        symbols = [rng.randrange(SYMBOLS) for _ in range(rng.randint(4, 6))]
        rows.append({"source": " ".join(f"s{s}" for s in symbols),
                     "target": " ".join(f"s{s}" for s in transform(domain, symbols))})
    return rows


def seq2seq_tokenizer():
    """A word-level fast tokenizer over the symbols that appends ``[SEP]`` (its end-of-sequence token), as T5's
    appends ``</s>``: the model learns where a target ends."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = make_tokenizer([f"s{i}" for i in range(SYMBOLS)])
    eos = SPECIALS.index("[SEP]")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A [SEP]", pair="$A [SEP] $B [SEP]", special_tokens=[("[SEP]", eos)])
    return tokenizer


def tiny_seq2seq(vocab_size: int, seed: int):
    """A tiny BART (d_model 32, 2+2 layers): its learned positions let it learn the rules in a few steps."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    eos = SPECIALS.index("[SEP]")
    config = BartConfig(vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                        pad_token_id=SPECIALS.index("[PAD]"), bos_token_id=SPECIALS.index("[CLS]"),
                        eos_token_id=eos, decoder_start_token_id=eos, forced_eos_token_id=None)
    return BartForConditionalGeneration(config)


def build_seq2seq_experts(root: Path, n_experts: int = 3, base_steps: int = 40, expert_steps: int = 120,
                          seed: int = 0) -> list[Path]:
    """``n_experts`` tiny BART experts under ``root/expert-{d}`` (and their base under ``root/base``)."""
    tokenizer = seq2seq_tokenizer()
    base = tiny_seq2seq(len(tokenizer), seed)
    return _build(root, tokenizer, base, seq2seq_rows, _seq2seq_batch, n_experts, base_steps, expert_steps, seed,
                  1e-2)


# --- target data ---------------------------------------------------------------------------------------------

def _write(folder: Path, make_rows, domain: int, n_train: int, n_test: int, seed: int,
           mix: Optional[Sequence[int]]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    domains = list(mix) if mix else [domain]
    for split, n, offset in (("train", n_train, 100), ("test", n_test, 200)):
        rows = [r for d in domains for r in make_rows(d, n // len(domains), seed + offset)]
        random.Random(seed).shuffle(rows)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_token_classification_dataset(folder: Path, domain: int, n_train: int = 256, n_test: int = 64,
                                       seed: int = 0, mix: Optional[Sequence[int]] = None) -> Path:
    """``train.jsonl`` / ``test.jsonl`` of ``domain`` (or an even ``mix``): ``tokens`` and ``ner_tags`` (names)."""
    return _write(folder, ner_rows, domain, n_train, n_test, seed, mix)


def write_seq2seq_dataset(folder: Path, domain: int, n_train: int = 256, n_test: int = 64, seed: int = 0,
                          mix: Optional[Sequence[int]] = None) -> Path:
    """``train.jsonl`` / ``test.jsonl`` of ``domain`` (or an even ``mix``): ``source`` and ``target`` texts."""
    return _write(folder, seq2seq_rows, domain, n_train, n_test, seed, mix)
