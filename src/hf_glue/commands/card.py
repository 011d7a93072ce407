"""`hf-glue card`: regenerate an output folder's model card from its merge_result.json."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import GlueError
from .parsing import build_configs

HELP = "Regenerate the model card of an output folder from merge_result.json."
DESCRIPTION = (
    "Rewrite README.md (and the trajectory PNG) of an hf-glue output folder from its merge_result.json; with "
    "--compare, embed the table of an `hf-glue compare` run.\n\nExample:\n  hf-glue card merged --compare "
    "compare/compare.json"
)
CONFIGS = ()


def add_arguments(parser) -> None:
    parser.add_argument("folder", help="The output folder whose card to regenerate.")
    parser.add_argument("--compare", help="compare.json (or its folder) from `hf-glue compare` to embed.")


def run(args: list[str], parser) -> int:
    (extra,) = build_configs(parser, CONFIGS, args)  # before the heavy imports: --help at once
    from ..report.result import RESULT_FILE, write_card

    folder = Path(extra.folder)
    if not (folder / RESULT_FILE).is_file():
        raise GlueError(f"{str(folder)!r} has no {RESULT_FILE}: is it an hf-glue output folder?")
    if extra.compare:
        source = Path(extra.compare)
        source = source / "compare.json" if source.is_dir() else source
        if not source.is_file():
            raise GlueError(f"--compare {extra.compare!r}: no compare.json there (run `hf-glue compare` first).")
        if source.resolve() != (folder / "compare.json").resolve():
            shutil.copy2(source, folder / "compare.json")
    print(f"Wrote {write_card(folder)}")
    return 0
