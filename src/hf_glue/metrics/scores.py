"""Plain scoring functions shared by the bundled `evaluate` modules and the tasks (no `evaluate` import: fast).

Entities (``seqeval``): spans read from tag sequences as seqeval's default (conlleval) mode does. Tags are
``PREFIX-TYPE`` with prefix B, I, E or S (L and U read as E and S: BILOU), or ``O``; IOB2, IOB1, IOE and BIOES all
read correctly (an I after O or after another type opens an entity, as in IOB1). A tag without a prefix (``PER``)
reads as ``I-PER``: each run of one type is one entity (the IO scheme).

Text (``text_overlap``): exact match and bag-of-tokens F1 (SQuAD's), and ROUGE-L (the F-measure of the longest
common subsequence of tokens), all on whitespace tokens after lowercasing and collapsing whitespace.
"""

from __future__ import annotations

from typing import Iterable, Sequence

_PREFIXES = {"B": "B", "I": "I", "E": "E", "S": "S", "L": "E", "U": "S"}


def split_tag(tag: str) -> tuple[str, str]:
    """``B-PER`` → (``B``, ``PER``); ``O`` → (``O``, ``""``); ``PER`` → (``I``, ``PER``)."""
    tag = str(tag)
    if tag == "O" or tag == "":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if sep and prefix.upper() in _PREFIXES and kind:
        return _PREFIXES[prefix.upper()], kind
    return "I", tag


def _ends(prev: str, prev_type: str, tag: str, kind: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != kind


def _starts(prev: str, prev_type: str, tag: str, kind: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag != "O" and prev_type != kind


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one sentence's tags: ``{(type, first, last)}`` (token positions, inclusive)."""
    found = set()
    prev, prev_type, start = "O", "", None
    for i, raw in enumerate(list(tags) + ["O"]):  # a trailing O closes the last entity
        tag, kind = split_tag(raw)
        if start is not None and _ends(prev, prev_type, tag, kind):
            found.add((prev_type, start, i - 1))
            start = None
        if _starts(prev, prev_type, tag, kind):
            start = i
        prev, prev_type = tag, kind
    return found


def entity_counts(predictions: Sequence[str], references: Sequence[str]) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of one sentence's predicted entities: an entity counts
    only when its type and both boundaries match."""
    pred, ref = entities(predictions), entities(references)
    tp = len(pred & ref)
    return tp, len(pred) - tp, len(ref) - tp


def prf(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Precision, recall and F1 from counts (0 where undefined, as seqeval reports them)."""
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
    }


def seqeval_scores(predictions: Iterable[Sequence[str]], references: Iterable[Sequence[str]]) -> dict:
    """Entity-level precision/recall/F1 over sentences (micro-averaged), token accuracy, and per-type scores
    (``per_type``: ``{type: {precision, recall, f1, number}}``, ``number`` being the reference entities)."""
    tp = fp = fn = correct = total = 0
    per_type: dict[str, list[int]] = {}
    for pred, ref in zip(predictions, references, strict=True):
        if len(pred) != len(ref):
            raise ValueError(f"a prediction has {len(pred)} tags and its reference {len(ref)}; they must match.")
        p, r = entities(pred), entities(ref)
        tp, fp, fn = tp + len(p & r), fp + len(p - r), fn + len(r - p)
        for kind, *_ in p | r:
            per_type.setdefault(kind, [0, 0, 0])
        for entity in p | r:
            counts = per_type[entity[0]]
            counts[0] += entity in p and entity in r
            counts[1] += entity in p and entity not in r
            counts[2] += entity in r and entity not in p
        correct += sum(a == b for a, b in zip(pred, ref))
        total += len(ref)
    return {
        **prf(tp, fp, fn),
        "accuracy": correct / total if total else 0.0,
        "per_type": {k: {**prf(*c), "number": c[0] + c[2]} for k, c in sorted(per_type.items())},
    }


def normalize_text(text: str) -> str:
    return " ".join(str(text).lower().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_text(prediction) == normalize_text(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1: the overlap of the two bags of tokens (1 when both are empty)."""
    from collections import Counter

    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    return 2 * common / (len(pred) + len(ref)) if common else 0.0


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: 2·LCS / (|prediction| + |reference|) over tokens, order-aware (1 when both are empty)."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    row = [0] * (len(ref) + 1)
    for a in pred:
        diagonal = 0
        for j, b in enumerate(ref, 1):
            diagonal, row[j] = row[j], diagonal + 1 if a == b else max(row[j], row[j - 1])
    return 2 * row[-1] / (len(pred) + len(ref))


def text_overlap_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L over pairs."""
    pairs = list(zip(predictions, references, strict=True))
    if not pairs:
        return {"exact_match": 0.0, "token_f1": 0.0, "rougeL": 0.0}
    n = len(pairs)
    return {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
        "token_f1": sum(token_f1(p, r) for p, r in pairs) / n,
        "rougeL": sum(rouge_l(p, r) for p, r in pairs) / n,
    }
