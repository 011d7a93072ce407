"""Default metrics shipped as local `evaluate` modules: `evaluate.load` by path never reaches the Hub."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

METRICS_DIR = Path(__file__).parent


@lru_cache(maxsize=None)
def load_metric(name: str):
    """`evaluate.load` of a bundled metric (``accuracy``, ``f1``, ``seqeval``, ``text_overlap``); evaluate is
    imported only here (it is slow)."""
    import evaluate

    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"no bundled metric {name!r}; bundled: {sorted(p.name for p in METRICS_DIR.iterdir() if p.is_dir())}")
    return evaluate.load(str(path))
