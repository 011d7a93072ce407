"""The search's saved state beside the output folder, and a graceful stop on SIGINT/SIGTERM.

The state is one JSON file (α in float64 round-trips exactly through JSON), replaced atomically, in a hidden
folder next to ``--output-dir`` (``.NAME.hf-glue-resume``). A run that ends well removes it; one that is
killed or interrupted leaves it for ``--resume``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import GlueError, SearchInterrupted
from .output import strict_json

__all__ = ["STATE_FILE", "Checkpoint", "SearchInterrupted", "StopRequest", "state_dir_for", "stop_signals"]

STATE_FILE = "search_state.json"


def state_dir_for(output_dir: str | Path) -> Path:
    """Where the search state of a run writing ``output_dir`` lives (a hidden sibling folder)."""
    out = Path(output_dir).expanduser().absolute()
    return out.parent / f".{out.name}.hf-glue-resume"


class Checkpoint:
    """Saves and loads the search state of one run; ``fingerprint`` identifies the run's inputs and settings."""

    def __init__(self, folder: Path, fingerprint: dict, every: int, write: bool = True) -> None:
        self.folder, self.fingerprint, self.every, self.write = Path(folder), fingerprint, every, write

    @property
    def file(self) -> Path:
        return self.folder / STATE_FILE

    def exists(self) -> bool:
        return self.file.is_file()

    def due(self, steps_done: int) -> bool:
        return self.every > 0 and steps_done % self.every == 0

    def save(self, state: dict[str, Any]) -> None:
        """Write the state atomically (a kill during the write leaves the previous state intact)."""
        if not self.write:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{STATE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(strict_json({"fingerprint": self.fingerprint, **state}))  # a rejected step's NaN: null
        os.replace(tmp, self.file)

    def load(self) -> dict[str, Any]:
        """The saved state; refuses one made by a run with other inputs or settings, naming the difference."""
        if not self.exists():
            raise GlueError(f"--resume: no saved search state in {self.folder} (it is written every "
                            "--checkpoint-every steps and when a run is interrupted); run without --resume.")
        try:
            state = json.loads(self.file.read_text())
        except (OSError, ValueError) as err:
            raise GlueError(f"--resume: the saved state {self.file} cannot be read ({err}); remove it and run "
                            "without --resume.") from None
        difference = _first_difference(state.pop("fingerprint", {}), self.fingerprint)
        if difference:
            key, was, now = difference
            raise GlueError(
                f"--resume: the saved state in {self.folder} was made with {key} = {was!r}, this run has {now!r}; "
                "resume with the same options (the search's settings, --steps included, and its inputs), or "
                "remove the folder and run without --resume.")
        return state

    def remove(self) -> None:
        if self.write:
            shutil.rmtree(self.folder, ignore_errors=True)


class StopRequest:
    """Set by SIGINT/SIGTERM while `stop_signals` is active: the search stops after the current step."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Turn SIGINT/SIGTERM into a request to stop after the current step (a second SIGINT stops at once)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _first_difference(saved: Any, current: Any, path: str = "") -> Optional[tuple[str, Any, Any]]:
    """The first (dotted key, saved value, current value) where two fingerprints differ, or None."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            found = _first_difference(saved.get(key), current.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if saved == current else (path, saved, current)
