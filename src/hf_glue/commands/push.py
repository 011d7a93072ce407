"""`hf-glue push`: upload an output folder to the Hub (e.g. to retry a failed push)."""

from __future__ import annotations

from pathlib import Path

from ..config import PushConfig
from ..errors import GlueError
from .parsing import build_configs

HELP = "Push an output folder to the Hub (e.g. to retry a failed push)."
DESCRIPTION = (
    "Upload an hf-glue output folder to a Hub repo, creating the repo (and --revision branch) if needed. The "
    "token comes from HF_TOKEN or `hf auth login`.\n\nExample:\n  hf-glue push merged --repo-id org/merged"
)
CONFIGS = (PushConfig,)


def add_arguments(parser) -> None:
    parser.add_argument("folder", help="The output folder to push (from hf-glue merge).")
    parser.add_argument("--repo-id", required=True, help="Target Hub repo, org/name.")


def run(args: list[str], parser) -> int:
    push, extra = build_configs(parser, CONFIGS, args)  # before the heavy imports: --help at once
    from ..io.hub import check_repo_id, push_folder
    from ..report.result import RESULT_FILE

    folder = Path(extra.folder)
    if not (folder / "config.json").is_file() or not (folder / RESULT_FILE).is_file():
        raise GlueError(f"{str(folder)!r} is not an hf-glue output folder (no config.json and {RESULT_FILE}).")
    check_repo_id(extra.repo_id)
    url = push_folder(folder, extra.repo_id, private=push.private, revision=push.revision,
                      create_pr=push.create_pr, commit_message=push.commit_message)
    print(f"Pushed {folder} to {url}")
    return 0
