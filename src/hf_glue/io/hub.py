"""Resolve repo ids (``org/name[@revision]``) or local folders to pinned local snapshots.

Everything downstream reads files from the returned folder; the commit sha goes into the result and card.

Every Hub look-up is bounded: the commit is asked for once per repo with ``HF_HUB_ETAG_TIMEOUT`` (huggingface_hub
itself waits without limit there, and retries for ~25 s); a Hub that does not answer is noted once per run and
the rest of the run reads the local cache.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import GlueError


@dataclass(frozen=True)
class ResolvedRepo:
    """One input pinned to a local folder: ``revision`` is the commit sha (None for a local folder)."""

    spec: str
    repo_id: str
    revision: Optional[str]
    path: Path
    repo_type: str = "model"

    @property
    def is_local(self) -> bool:
        return self.revision is None

    def to_dict(self) -> dict:
        """Its id and revision, and the licence its model card states (when it states one)."""
        licence = self.card_metadata().get("license")
        return {"id": self.repo_id, "revision": self.revision,
                "license": str(licence) if isinstance(licence, (str, int, float)) else None}

    def card_metadata(self) -> dict:
        """The YAML front matter of the repo's README.md (its model card), or {} when there is none or it is
        unreadable."""
        import yaml

        card = self.path / "README.md" if self.path.is_dir() else None
        if card is None or not card.is_file():
            return {}
        text = card.read_text(encoding="utf-8", errors="replace")
        if not text.startswith("---"):
            return {}
        try:
            meta = yaml.safe_load(text.split("---", 2)[1])
        except yaml.YAMLError:
            return {}
        return meta if isinstance(meta, dict) else {}


def split_spec(spec: str) -> tuple[str, Optional[str]]:
    """``org/name@rev`` -> (``org/name``, ``rev``)."""
    if "@" in spec:
        repo_id, revision = spec.rsplit("@", 1)
        return repo_id, revision or None
    return spec, None


#: suffixes of files a user names (data, weights, configs): a spec ending in one is a path, never a Hub repo id
FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".arrow", ".safetensors", ".bin", ".pt",
                 ".yaml", ".yml")


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` names a local file or folder rather than a Hub repo (``org/name[@rev]``): it starts like
    a path (``/``, ``./``, ``../``, ``~``), has more than one separator before any revision, or ends in a file
    suffix (``data/target.csv``)."""
    if spec.startswith(("/", "./", "../", "~", ".\\")) or spec in (".", ".."):
        return True
    repo_id = spec.split("@", 1)[0]
    return repo_id.count("/") > 1 or "\\" in repo_id or repo_id.lower().endswith(FILE_SUFFIXES)


def refuse_missing_path(spec: str, what: str) -> None:
    """Refuse ``spec`` when it names a local path (`looks_like_path`) that does not exist, naming ``what``."""
    local = Path(spec).expanduser()
    if looks_like_path(spec) and not local.exists():
        raise GlueError(f"{what} {spec!r}: no such file or folder ({local.absolute()}); check the path "
                        "(a Hub repo id is org/name).")


def check_repo_id(repo_id: str) -> None:
    """Refuse, before any work, a push target that is not a valid ``org/name`` repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise GlueError(f"{repo_id!r} is not a valid Hub repo id for --push-to-hub/--repo-id (expected org/name).") from None


def resolve(
    spec: str,
    *,
    repo_type: str = "model",
    allow_patterns: Optional[Sequence[str]] = None,
    what: str = "expert",
) -> ResolvedRepo:
    """Pin ``spec`` to a local snapshot, downloading only ``allow_patterns``; errors name ``what`` and ``spec``."""
    local = Path(spec).expanduser()
    if local.exists():
        return ResolvedRepo(spec=spec, repo_id=spec, revision=None, path=local.resolve(), repo_type=repo_type)
    refuse_missing_path(spec, what)
    repo_id, revision = split_spec(spec)
    path = _snapshot(repo_id, revision=revision, repo_type=repo_type, allow_patterns=allow_patterns, what=what, spec=spec)
    return ResolvedRepo(spec=spec, repo_id=repo_id, revision=path.name, path=path, repo_type=repo_type)


def download(repo: ResolvedRepo, allow_patterns: Sequence[str], what: str = "expert") -> Path:
    """Fetch more files of an already pinned repo (same commit); a no-op for local folders."""
    if repo.is_local:
        return repo.path
    return _snapshot(
        repo.repo_id, revision=repo.revision, repo_type=repo.repo_type, allow_patterns=allow_patterns, what=what,
        spec=repo.spec,
    )


#: This run's Hub state: endpoints found unreachable (→ why) and the specs already announced.
_UNREACHABLE: dict[str, str] = {}
_ANNOUNCED: set[str] = set()
_HTTP_MODULES = ("httpx", "httpx2", "httpcore", "httpcore2", "h11")


def new_run() -> None:
    """Forget which endpoints were unreachable and which repos were announced (the CLI calls this per command)."""
    _UNREACHABLE.clear()
    _ANNOUNCED.clear()


def _endpoint() -> str:
    """The Hub endpoint for messages, without any ``user:password@`` part."""
    from urllib.parse import urlsplit, urlunsplit

    from huggingface_hub import constants

    parts = urlsplit(constants.ENDPOINT)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or constants.ENDPOINT in _UNREACHABLE


def _pin(repo_id: str, revision: Optional[str], repo_type: str, spec: str) -> Optional[str]:
    """The commit ``revision`` points to, asked of the Hub within ``HF_HUB_ETAG_TIMEOUT`` seconds; None (after
    one note for the run) when the Hub cannot be reached, so that the caller reads the local cache."""
    from huggingface_hub import HfApi, constants

    if spec not in _ANNOUNCED:
        _ANNOUNCED.add(spec)
        print(f"Resolving {spec} on {_endpoint()} ...", file=sys.stderr, flush=True)
    try:
        return HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision,
                                 timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
    except Exception as err:
        reason = _unreachable_reason(err)
        if reason is None:
            raise
    _UNREACHABLE[constants.ENDPOINT] = reason
    print(f"note: the Hub at {_endpoint()} cannot be reached ({reason}); this run uses the local cache "
          f"({_cache_dir()}) for every repo.", file=sys.stderr, flush=True)
    return None


def _unreachable_reason(err: Exception) -> Optional[str]:
    """Why the Hub could not answer (network failure, timeout, server error); None for any other exception."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        return f"HTTP {status}" if status is not None and (status >= 500 or status == 429) else None
    name = type(err).__name__
    if "Timeout" in name or isinstance(err, TimeoutError):
        return f"no answer within {constants.HF_HUB_ETAG_TIMEOUT} s"
    if type(err).__module__.split(".")[0] in _HTTP_MODULES or isinstance(err, ConnectionError):
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{name}{' - ' + detail if detail else ''}"
    return None


def _snapshot(
    repo_id: str, *, revision: Optional[str], repo_type: str, allow_patterns, what: str, spec: str
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        pinned = None if _offline() else _pin(repo_id, revision, repo_type, spec)
        path = snapshot_download(
            repo_id, revision=pinned or revision, repo_type=repo_type, local_files_only=pinned is None,
            allow_patterns=list(allow_patterns or []) or None,
        )
    except HFValidationError:
        raise GlueError(
            f"{what} {spec!r} is neither an existing local folder nor a valid Hub repo id (expected org/name)."
        ) from None
    except GatedRepoError:
        raise GlueError(
            f"{what} {spec!r} is gated: accept its terms on the Hub and log in with `hf auth login`."
        ) from None
    except RevisionNotFoundError:
        raise GlueError(f"{what} {spec!r}: revision {revision!r} does not exist in {repo_id}.") from None
    except RepositoryNotFoundError:
        raise GlueError(
            f"{what} {spec!r} was not found on the Hub: check the id, or log in with `hf auth login` "
            "if it is private."
        ) from None
    except IncompleteSnapshotError:
        raise GlueError(f"{what} {spec!r}: its cached copy lacks files this run needs and {_why_offline()}; "
                        "download it again with network access.") from None
    except LocalEntryNotFoundError:
        cached = _cached_revisions(repo_id, repo_type)
        if revision and cached:
            raise GlueError(
                f"{what} {spec!r}: revision {revision!r} is not in the local cache of {repo_id} ({cached}) and "
                f"{_why_offline()}: check the revision, or download it first."
            ) from None
        download = f"`hf download {repo_id}{' --repo-type dataset' if repo_type == 'dataset' else ''}`"
        raise GlueError(
            f"{what} {spec!r} is not in the local Hugging Face cache ({_cache_dir()}) and {_why_offline()}: "
            f"check the id, or download it first ({download})."
        ) from None
    except OSError as err:  # network errors, disk errors
        raise GlueError(f"{what} {spec!r} could not be downloaded: {err}") from None
    return Path(path)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return os.fspath(constants.HF_HUB_CACHE)


def _why_offline() -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    reason = _UNREACHABLE.get(constants.ENDPOINT, "no answer")
    return f"the Hub ({_endpoint()}) cannot be reached ({reason}; check your network or HF_ENDPOINT)"


def _cached_revisions(repo_id: str, repo_type: str) -> Optional[str]:
    """What the local cache holds of a repo, e.g. ``cached: main → 1a2b3c4d5e, snapshot 9f8e7d6c5b``; None if
    nothing."""
    from huggingface_hub.constants import REPO_ID_SEPARATOR

    folder = Path(_cache_dir()) / f"{repo_type}s{REPO_ID_SEPARATOR}{repo_id.replace('/', REPO_ID_SEPARATOR)}"
    refs = {p.relative_to(folder / "refs").as_posix(): p.read_text().strip()[:10]
            for p in sorted((folder / "refs").rglob("*")) if p.is_file()}
    snapshots = sorted(p.name[:10] for p in (folder / "snapshots").glob("*") if p.is_dir())
    unnamed = [s for s in snapshots if s not in refs.values()]
    parts = [f"{ref} → {sha}" for ref, sha in refs.items()] + [f"snapshot {sha}" for sha in unnamed]
    return f"cached: {', '.join(parts)}" if parts else None


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    create_pr: bool = False,
    commit_message: Optional[str] = None,
) -> str:
    """Upload ``folder`` to ``repo_id`` (created if missing; ``revision`` branch created if missing).

    The token comes from the environment (``HF_TOKEN``) or ``hf auth login``, never from an argument. Returns the
    commit (or pull-request) URL. Any failure is a `GlueError` that says how to retry with ``hf-glue push``.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi()
    retry = retry_command(folder, repo_id, private=private, revision=revision, create_pr=create_pr)
    print(f"Pushing {folder} to {repo_id} on {_endpoint()} ...", file=sys.stderr, flush=True)
    try:
        try:  # bounded: a Hub that does not answer fails here, within HF_HUB_ETAG_TIMEOUT
            api.repo_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except RepositoryNotFoundError:
            pass  # created next
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload GLUE merge (hf-glue)",
            ignore_patterns=[".*"],
        )
    except Exception as err:
        reason = _push_failure(err)
        if reason is None:  # a bug, not a failed push
            raise
        raise GlueError(f"push to {repo_id!r} failed: {reason}. The output in {str(folder)!r} is intact; "
                        f"retry with: {retry}") from None
    return str(info.pr_url or info.commit_url)


def _push_failure(err: Exception) -> Optional[str]:
    """Why a push failed, for HTTP answers, network errors and malformed answers; None for anything else."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        reason = f"HTTP {status}" if status else "HTTP error"
        if status in (401, 403):
            reason += " (not authorised: set HF_TOKEN or run `hf auth login` with a write token)"
        return reason
    # OSError: connection refused, timeouts; ValueError: malformed answers; httpx errors are neither
    if isinstance(err, (OSError, ValueError)) or type(err).__module__.split(".")[0] in (
            "httpx", "httpx2", "httpcore", "httpcore2"):
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0] if lines else ''}"
    return None


def retry_command(
    folder: Path, repo_id: str, *, private: bool = False, revision: Optional[str] = None, create_pr: bool = False
) -> str:
    import shlex

    parts = ["hf-glue", "push", shlex.quote(str(folder)), "--repo-id", shlex.quote(repo_id)]
    if private:
        parts.append("--private")
    if revision:
        parts += ["--revision", shlex.quote(revision)]
    if create_pr:
        parts.append("--create-pr")
    return " ".join(parts)
