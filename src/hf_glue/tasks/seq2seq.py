"""Sequence-to-sequence LM (T5, BART): loss on labels; a generation-based metric for evaluation."""
