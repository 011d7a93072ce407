"""Levenshtein distance and word/character error counts (WER, CER): plain Python, shared by the bundled ``wer``
`evaluate` module and the CTC task (no `evaluate` or jiwer import)."""

from __future__ import annotations

from typing import Hashable, Sequence


def edit_distance(reference: Sequence[Hashable], hypothesis: Sequence[Hashable]) -> int:
    """The fewest substitutions, deletions and insertions that turn ``reference`` into ``hypothesis``."""
    if len(reference) < len(hypothesis):
        reference, hypothesis = hypothesis, reference  # the distance is symmetric; keep the row short
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def error_counts(predictions: Sequence[str], references: Sequence[str]) -> dict[str, int]:
    """Summed word and character edit distances and reference lengths of text pairs: words are whitespace-split,
    characters are those of the words joined by single spaces."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    counts = {"word_errors": 0, "words": 0, "char_errors": 0, "chars": 0}
    for prediction, reference in zip(predictions, references):
        hyp, ref = str(prediction).split(), str(reference).split()
        counts["word_errors"] += edit_distance(ref, hyp)
        counts["words"] += len(ref)
        counts["char_errors"] += edit_distance(" ".join(ref), " ".join(hyp))
        counts["chars"] += len(" ".join(ref))
    return counts


def rates(counts: dict[str, float]) -> dict[str, float]:
    """Corpus WER and CER from summed counts: errors over reference words (characters); 0 references count as 1."""
    return {"wer": counts["word_errors"] / max(counts["words"], 1),
            "cer": counts["char_errors"] / max(counts["chars"], 1)}
