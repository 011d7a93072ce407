"""Output folders: refused before any work when they are unsafe, written beside the target and renamed into place
only when complete.

``--overwrite-output-dir`` replaces only a previous hf-glue output: one whose marker file (``merge_result.json``
or ``compare.json``) lists every file hf-glue wrote there (``"files"``; older outputs: known names), so no file
the tool did not write is ever deleted. Inputs (experts, the dataset, the Hugging Face cache) are never output.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from ..errors import GlueError

RESULT_FILE = "merge_result.json"
COMPARE_FILE = "compare.json"
#: Files a previous hf-glue output may hold when its marker has no ``"files"`` list (outputs of older versions).
KNOWN_OUTPUT_FILES = frozenset({
    RESULT_FILE, COMPARE_FILE, "compare.png", "README.md", "glue_trajectory.png", "config.json",
    "generation_config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
    "special_tokens_map.json", "preprocessor_config.json", "tokenizer_config.json", "chat_template.jinja",
    "chat_template.json", "processor_config.json", "mergekit_config.yml",
})
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
#: Files `hf-glue card` may (re)write in an output after the fact.
CARD_FILES = frozenset({"README.md", "glue_trajectory.png", COMPARE_FILE, "mergekit_config.yml"})
_HOST = socket.gethostname()


class Terminated(GlueError):
    """SIGTERM arrived while an output folder was being written; the partial folder is removed."""


def strict_json(data: Any) -> str:
    """``data`` as strict JSON (indented, newline-terminated): NaN and ±inf become ``null``."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=2, allow_nan=False) + "\n"


def input_paths(experts: Sequence[str] = (), dataset: Optional[str] = None,
                extra: Iterable[tuple[str, str | Path]] = ()) -> list[tuple[str, Path]]:
    """The local inputs an output folder must stay clear of, as (description, path): experts and the dataset
    given as local paths, and ``extra`` (the Hugging Face cache is always added by `check_output_dir`)."""
    found = [(f"expert {spec!r}", Path(spec).expanduser()) for spec in experts]
    if dataset:
        found.append((f"the dataset {dataset!r}", Path(dataset).expanduser()))
    found += [(what, Path(path).expanduser()) for what, path in extra]
    return [(what, path) for what, path in found if path.exists()]


def check_output_dir(output_dir: str | Path, overwrite: bool, protected: Sequence[tuple[str, Path]] = (),
                     marker: str = RESULT_FILE) -> Path:
    """Refuse, before any work, an output folder that is unsafe to write: it exists (without ``overwrite``),
    holds files hf-glue did not write (with it), is/contains/lies inside an input or the Hugging Face cache, or
    cannot be written. Removes partial outputs left by dead processes. Returns the folder's absolute path."""
    from huggingface_hub import constants

    path = Path(os.path.abspath(Path(output_dir).expanduser()))
    shown = str(output_dir)
    real = path.resolve()
    for what, source in [*protected, ("the Hugging Face cache", Path(constants.HF_HUB_CACHE))]:
        source = source.resolve()
        relation = ("is" if real == source else "lies inside" if source in real.parents
                    else "contains" if real in source.parents else None)
        if relation:
            raise GlueError(f"output folder {shown!r} {relation} {what} ({source}): choose an --output-dir "
                            "outside the inputs.")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise GlueError(f"output path {shown!r} exists and is not a folder.")
        empty = not path.is_symlink() and not any(path.iterdir())  # an empty folder is simply filled
        if not overwrite and not empty:
            raise GlueError(f"output folder {shown!r} already exists and is not empty: choose another --output-dir, "
                            "or pass --overwrite-output-dir to replace a previous hf-glue output there.")
        cwd = Path.cwd().resolve()
        if real == cwd or real in cwd.parents:
            raise GlueError(f"output folder {shown!r} is or holds the current directory: choose a new "
                            "--output-dir (a subfolder such as ./merged).")
        foreign = foreign_files(path, marker)
        if foreign:
            raise GlueError(
                f"output folder {shown!r} holds {len(foreign)} file(s) hf-glue did not write (e.g. {foreign[0]!r}"
                f"): --overwrite-output-dir replaces only a previous hf-glue output ({marker}); move them or "
                "choose another --output-dir.")
    parent = path.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise GlueError(f"output folder {shown!r} cannot be created: {str(parent)!r} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GlueError(f"output folder {shown!r} cannot be written: no write permission in {str(parent)!r} "
                        "(or it is read-only); choose another --output-dir.")
    remove_stale_partials(path)
    return path


def foreign_files(folder: Path, marker: str = RESULT_FILE) -> list[str]:
    """Files under ``folder`` (relative, sorted) that no hf-glue run wrote, judged by ``marker``'s ``"files"``
    list or, for older outputs, by known output names; every file counts when there is no marker."""
    allowed: Optional[set[str]] = set()
    if (folder / marker).is_file():
        try:
            listed = json.loads((folder / marker).read_text()).get("files")
        except (OSError, ValueError, AttributeError):
            listed = None
        allowed = {marker, *CARD_FILES, *listed} if isinstance(listed, list) else None
    found = []
    for root, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]  # never followed: count as files
        for name in sorted(files + links):
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            known = rel in allowed if allowed is not None else (rel in KNOWN_OUTPUT_FILES or _SHARD.fullmatch(rel))
            if not known:
                found.append(rel)
    return sorted(found)


def output_bytes(tensors: Iterable, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of one model's weights from a tensor index (`TensorInfo`s), floats counted in ``dtype`` if given."""
    total = 0
    for info in tensors:
        out = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        total += info.numel * torch.empty((), dtype=out).element_size()
    return total


def check_free_space(output_dir: Optional[str | Path], needed: int) -> None:
    """Refuse, before the search, an output location without ``needed`` bytes free (no-op without a folder)."""
    if not output_dir:
        return
    place = Path(os.path.abspath(Path(output_dir).expanduser())).parent
    while not place.exists():
        place = place.parent
    free = shutil.disk_usage(place).free
    if free < needed:
        raise GlueError(f"the output needs about {_size(needed)} but {str(place)!r} has only {_size(free)} free: "
                        "free some space or choose another --output-dir.")


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str, advice: str) -> None:
    """Refuse to write weights holding NaN or inf, naming the first such tensor."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise GlueError(f"{what} tensor {name!r} holds NaN or inf values; nothing was written: {advice}")


def final_name(folder: Path) -> str:
    """The name ``folder`` will have when its write finishes (an `atomic_dir` partial's target's name)."""
    match = re.fullmatch(r"\.(.+)\.partial-\d+@.+", Path(folder).resolve().name)
    return match.group(1) if match else Path(folder).resolve().name


def remove_stale_partials(output_dir: Path) -> None:
    """Remove ``.NAME.partial-*`` / ``.NAME.old-*`` folders beside ``output_dir`` whose writer (on this host) is
    gone; a running writer's are kept."""
    pattern = re.compile(rf"\.{re.escape(output_dir.name)}\.(?:partial|old)-(\d+)@(.+)-[^-]+")
    if not output_dir.parent.is_dir():
        return
    for entry in output_dir.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and match.group(2) == _HOST and entry.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(output_dir: str | Path, overwrite: bool = False, marker: str = RESULT_FILE) -> Iterator[Path]:
    """Yield a temporary folder next to ``output_dir``; on success it replaces ``output_dir`` (its files get the
    user's usual permissions and are listed in ``marker``), on error or SIGTERM it is removed."""
    final = check_output_dir(output_dir, overwrite, marker=marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}@{_HOST}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{tag}", dir=final.parent))
    old = None
    try:
        with _sigterm_raises(final):
            yield tmp
            _finish(tmp, marker)
            if overwrite and (final.exists() or final.is_symlink()):
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{tag}", dir=final.parent))
                final.rename(old / final.name)
            try:
                _place(tmp, final)
            except OSError:
                restored = False
                if old is not None:  # --overwrite-output-dir: put the previous output back
                    try:
                        (old / final.name).rename(final)
                        restored = True
                    except OSError:
                        pass  # another run's output took the place meanwhile: ours goes beside it, below
                if restored or not (final.exists() or final.is_symlink()):
                    raise
                kept = _place_beside(tmp, final)
                raise GlueError(f"output folder {str(output_dir)!r} was written by another run while this one ran; "
                                f"that output is left as it is, and this run's complete output is in {str(kept)!r}.") \
                    from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``. The rename is the check against another run: it fails, atomically,
    when ``final`` was filled after this run checked it; an empty folder there (allowed by the check) is removed
    first where the system will not rename onto it (Windows)."""
    try:
        tmp.rename(final)
    except OSError:
        if not (final.is_dir() and not final.is_symlink() and not any(final.iterdir())):
            raise
        final.rmdir()  # fails in turn if another run fills it now
        tmp.rename(final)


def _place_beside(tmp: Path, final: Path) -> Path:
    """Rename ``tmp`` to the first free ``final-N`` (``out/C`` → ``out/C-2``); returns it."""
    for n in range(2, 10_000):
        kept = final.with_name(f"{final.name}-{n}")
        if kept.exists() or kept.is_symlink():
            continue
        try:
            tmp.rename(kept)
            return kept
        except OSError:
            if not (kept.exists() or kept.is_symlink()):
                raise
    raise OSError(f"no free name beside {final}")


def _finish(folder: Path, marker: str) -> None:
    """Give every file the user's usual permissions (safetensors writes 0600) and list them in ``marker``."""
    umask = os.umask(0)
    os.umask(umask)
    files = []
    for root, dirs, names in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)
            files.append(os.path.relpath(path, folder).replace(os.sep, "/"))
        files += [os.path.relpath(os.path.join(root, d), folder).replace(os.sep, "/") for d in dirs
                  if os.path.islink(os.path.join(root, d))]
    if (folder / marker).is_file():
        data = json.loads((folder / marker).read_text())
        if isinstance(data, dict):
            data["files"] = sorted(files)
            (folder / marker).write_text(strict_json(data))


@contextlib.contextmanager
def _sigterm_raises(final: Path) -> Iterator[None]:
    """While active (main thread only), SIGTERM raises `Terminated` so the partial output is cleaned up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"terminated (SIGTERM) while writing {str(final)!r}; the partial output was removed "
                         "and nothing was written.")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"
