"""Write an output folder atomically: build it beside the target, rename into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import GlueError


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, an output folder that exists (unless ``overwrite``) or cannot be created."""
    path = Path(output_dir).expanduser()
    if path.exists() and not overwrite:
        raise GlueError(f"output folder {str(path)!r} already exists: choose another --output-dir or pass "
                        "--overwrite-output-dir.")
    if path.exists() and not path.is_dir():
        raise GlueError(f"output path {str(path)!r} exists and is not a folder.")
    return path


@contextlib.contextmanager
def atomic_dir(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``output_dir``; on success it replaces ``output_dir``, on error it is removed."""
    final = check_output_dir(output_dir, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output gets the user's usual permissions
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            final.rename(old / final.name)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
