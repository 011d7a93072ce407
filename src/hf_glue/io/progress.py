"""Progress of long loops as the user can read it: a tqdm bar on a terminal; when stderr goes to a file or a pipe,
a plain line about every tenth of the way (as the Trainer logs), never hundreds of carriage-return updates."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional

#: lines a redirected loop prints at most (plus its last one)
LINES = 10
#: seconds between the lines of a loop whose length is unknown
EVERY_SECONDS = 30.0


def on_terminal() -> bool:
    """Whether stderr is shown live: a terminal, or a notebook's output stream (ipykernel's says it is no tty, yet
    tqdm.auto draws its widget there)."""
    return sys.stderr.isatty() or type(sys.stderr).__module__.split(".")[0] in ("ipykernel", "google")


class LineProgress:
    """tqdm's interface for what hf-glue uses of it (iteration, ``set_postfix_str``, ``close``), as plain lines:
    ``desc: 20/100 (postfix) 3.1 s`` about every tenth of the loop and at its end."""

    def __init__(self, iterable: Iterable, desc: str, total: Optional[int], initial: int = 0) -> None:
        self.iterable, self.desc, self.initial = iterable, desc, initial
        self.total = total if total is not None else (initial + len(iterable) if hasattr(iterable, "__len__")
                                                      else None)
        # a line every tenth of the loop; of a loop of unknown length, one every EVERY_SECONDS
        self.every = max(1, self.total // LINES) if self.total else None
        self.postfix, self.start = "", time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        n, last = self.initial, self.start
        for item in self.iterable:
            yield item
            n += 1
            now = time.perf_counter()
            due = n % self.every == 0 if self.every else now - last >= EVERY_SECONDS
            if due or n == self.total:
                last = now
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


LIBRARY_BARS = ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS")


@contextlib.contextmanager
def quiet_library_bars() -> Iterator[None]:
    """While a command runs with stderr redirected, the bars of datasets, huggingface_hub and transformers (weight
    loading, tokenizing, downloads) are off (set before they are imported; the user's own settings win, and the
    environment is restored after, for callers of `main` in a longer process)."""
    saved = {name: os.environ.get(name) for name in LIBRARY_BARS}
    if not on_terminal():
        for name in LIBRARY_BARS:
            os.environ.setdefault(name, "1")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
