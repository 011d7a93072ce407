"""The exceptions users see: bad input (named culprit, what to do) and a search stopped by a signal. The CLI prints
each as one line; nothing here imports torch, so the CLI can catch them before any heavy import."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional


class GlueError(ValueError):
    """A problem with the user's input (expert, dataset, column, option), found before or during a run.

    The message names the culprit and the fix; the CLI prints it without a traceback.
    """


class SearchInterrupted(Exception):
    """SIGINT/SIGTERM stopped the search after a step; the state was saved for ``--resume`` (if there is one)."""

    def __init__(self, step: int, total: int, signum: int, state_dir: Optional[Path]) -> None:
        self.step, self.total, self.signum, self.state_dir = step, total, signum, state_dir
        where = f"; the search state is saved in {state_dir}" if state_dir else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step} of {total}{where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
