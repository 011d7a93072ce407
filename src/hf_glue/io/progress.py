"""Progress of long loops as the user can read it: a tqdm bar on a terminal; when stderr goes to a file or a pipe,
a plain line about every tenth of the way (as the Trainer logs), never hundreds of carriage-return updates."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional

#: lines a redirected loop prints at most (plus its last one)
LINES = 10


def on_terminal() -> bool:
    """Whether stderr is an interactive terminal (where a redrawn bar reads well)."""
    return sys.stderr.isatty()


class LineProgress:
    """tqdm's interface for what hf-glue uses of it (iteration, ``set_postfix_str``, ``close``), as plain lines:
    ``desc: 20/100 (postfix) 3.1 s`` about every tenth of the loop and at its end."""

    def __init__(self, iterable: Iterable, desc: str, total: Optional[int], initial: int = 0) -> None:
        self.iterable, self.desc, self.initial = iterable, desc, initial
        self.total = total if total is not None else (initial + len(iterable) if hasattr(iterable, "__len__")
                                                      else None)
        self.every = max(1, (self.total or LINES) // LINES)
        self.postfix, self.start = "", time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        n = self.initial
        for item in self.iterable:
            yield item
            n += 1
            if n % self.every == 0 or n == self.total:
                of = f"/{self.total}" if self.total is not None else ""
                postfix = f" ({self.postfix})" if self.postfix else ""
                print(f"{self.desc}: {n}{of}{postfix} {time.perf_counter() - self.start:.1f} s", file=sys.stderr,
                      flush=True)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        """Nothing to clear (tqdm's interface)."""


class Silent(LineProgress):
    """A loop that reports nothing (other processes, or TQDM_DISABLE set)."""

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)


def progress(iterable: Iterable, desc: str, *, total: Optional[int] = None, initial: int = 0,
             disable: bool = False):
    """A tqdm bar on a terminal, lines when stderr is redirected, nothing when ``disable`` or ``TQDM_DISABLE``."""
    if disable or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return Silent(iterable, desc, total, initial)
    if on_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial, dynamic_ncols=True)
    return LineProgress(iterable, desc, total, initial)


def quiet_library_bars() -> None:
    """When stderr is redirected, turn off the bars of datasets, huggingface_hub and transformers (weight loading,
    tokenizing, downloads) before they are imported; the user's own settings win."""
    if on_terminal():
        return
    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")
