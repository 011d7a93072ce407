"""`hf-glue` command line: argument parsing only; every command calls the same functions as the Python API.

Options come from the dataclasses in `config.py` (their help text is `--help`); ``--config FILE.yaml`` sets
defaults that flags on the command line override; unknown keys in the file are errors.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import (
    BlendConfig,
    CompareConfig,
    DataConfig,
    ExpertsConfig,
    FinetuneConfig,
    GlueConfig,
    OutputConfig,
    PushConfig,
)
from .errors import GlueError

MERGE_CONFIGS = (ExpertsConfig, DataConfig, GlueConfig, FinetuneConfig, OutputConfig, PushConfig)
PUSH_CONFIGS = (PushConfig,)
BLEND_CONFIGS = (ExpertsConfig, BlendConfig, OutputConfig)
COMPARE_CONFIGS = (ExpertsConfig, DataConfig, GlueConfig, FinetuneConfig, CompareConfig)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the description's examples keep their lines."""


def _dataclass_parser(subparsers, name: str, help: str, description: str, configs: Sequence[type]):
    parser = subparsers.add_parser(
        name, help=help, description=description, dataclass_types=list(configs),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (flags given here win).")
    return parser


def _build_configs(parser, configs: Sequence[type], argv: Sequence[str]) -> list:
    """Parse ``argv`` into the dataclasses (then the namespace of any other options), taking defaults from
    ``--config FILE.yaml`` when given."""
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise GlueError("--config needs a YAML file path.")
        path = Path(argv[i + 1])
        del argv[i: i + 2]
        parser.set_defaults(**_read_yaml(path, configs))
    try:
        outputs = list(parser.parse_args_into_dataclasses(args=argv))
    except GlueError:  # raised by a config's own validation: already says what to do
        raise
    except (TypeError, ValueError) as err:
        raise GlueError(str(err)) from None
    # options that are not dataclass fields (--config, positionals) come back as a trailing namespace
    return outputs if len(outputs) > len(configs) else outputs + [argparse.Namespace()]


def _read_yaml(path: Path, configs: Sequence[type]) -> dict:
    import yaml

    if not path.is_file():
        raise GlueError(f"config file {str(path)!r} does not exist.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise GlueError(f"config file {str(path)!r} must hold a mapping of option: value.")
    known = {f.name for c in configs for f in fields(c)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GlueError(f"unknown options in {str(path)!r}: {unknown}; remove them or check their spelling.")
    return values


def merge_command(args: list[str], parser) -> int:
    from .pipeline import run_merge

    experts, data, glue, finetune, output, push, _ = _build_configs(parser, MERGE_CONFIGS, args)
    if not output.output_dir:
        raise GlueError("no output folder: pass --output-dir DIR.")
    result = run_merge(experts, data, glue, output, command=shlex.join(["hf-glue", "merge", *args]),
                       finetune_config=finetune, push_config=push)
    if _is_main():
        _print_summary(result, output.output_dir)
    return 0


def compare_command(args: list[str], parser) -> int:
    from .compare import run_compare

    experts, data, glue, finetune, compare, _ = _build_configs(parser, COMPARE_CONFIGS, args)
    run_compare(experts, data, glue, finetune, compare)
    return 0


def blend_command(args: list[str], parser) -> int:
    from .blend_files import run_blend

    experts, blend, output, _ = _build_configs(parser, BLEND_CONFIGS, args)
    folder = run_blend(experts, blend, output, command=shlex.join(["hf-glue", "blend", *args]))
    print(f"Wrote the blend to {folder}")
    return 0


def push_command(args: list[str], parser) -> int:
    from .hub import check_repo_id, push_folder
    from .result import RESULT_FILE

    push, extra = _build_configs(parser, PUSH_CONFIGS, args)
    folder = Path(extra.folder)
    if not (folder / "config.json").is_file() or not (folder / RESULT_FILE).is_file():
        raise GlueError(f"{str(folder)!r} is not an hf-glue output folder (no config.json and {RESULT_FILE}).")
    check_repo_id(extra.repo_id)
    url = push_folder(folder, extra.repo_id, private=push.private, revision=push.revision,
                      create_pr=push.create_pr, commit_message=push.commit_message)
    print(f"Pushed {folder} to {url}")
    return 0


def card_command(args: list[str], parser) -> int:
    import shutil

    from .result import RESULT_FILE, write_card

    (extra,) = _build_configs(parser, (), args)
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


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _print_summary(result, output_dir: Optional[str]) -> None:
    width = max(len(n) for n in result.coefficients)
    print(f"Learned coefficients ({result.method}, {result.forward_passes} forward passes, {result.seconds:.1f} s):")
    for name, value in result.coefficients.items():
        print(f"  {name:<{width}}  {value:.4f}")
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in (result.eval_after or result.eval).items())
    if metrics:
        print(f"Held-out target: {metrics}")
    if output_dir:
        print(f"Saved to {output_dir}")
    if result.details.get("pushed_to"):
        print(f"Pushed to {result.details['pushed_to']}")


COMMANDS: dict[str, tuple[str, str, Sequence[type], Callable]] = {
    "merge": (
        "Learn merge coefficients on target data and save the merged model.",
        "Merge fine-tuned experts of one architecture into one model for a target dataset: α is learned with "
        "two-point SPSA (GLUE), the experts are blended as θ = Σ α_k θ_k, and the model, tokenizer, model card "
        "and merge_result.json are written to --output-dir.\n\nExample:\n  hf-glue merge --experts org/a org/b "
        "--dataset org/target --output-dir merged --steps 100",
        MERGE_CONFIGS,
        merge_command,
    ),
    "compare": (
        "Compare GLUE with the baselines (and each expert alone) on the same inputs.",
        "Run several merge methods on the same resolved experts and target data — GLUE, uniform, data-size "
        "weighting, proxy selection, full-gradient mixing, and every expert alone — optionally fine-tune each "
        "result, and print a table of coefficients, target metrics (mean ± std over --seeds), passes, time and "
        "peak memory. Writes compare.json and compare.png to --output-dir.\n\nExample:\n  hf-glue compare "
        "--experts org/a org/b org/c --dataset org/target --data-sizes 1000 5000 2000 --seeds 0 1 2",
        COMPARE_CONFIGS,
        compare_command,
    ),
    "blend": (
        "Write the blend for known coefficients, streaming from the experts' files (no data needed).",
        "Apply coefficients — given with --weights, or an earlier merge's merge_result.json with --from-result — "
        "to the experts' safetensors and write the merged model, reading and writing one tensor at a time (memory "
        "stays near the size of the largest tensor).\n\nExamples:\n  hf-glue blend --experts org/a org/b "
        "--weights 0.7 0.3 --output-dir blended\n  hf-glue blend --from-result merged/merge_result.json "
        "--output-dir blended --dtype bfloat16",
        BLEND_CONFIGS,
        blend_command,
    ),
    "push": (
        "Push an output folder to the Hub (e.g. to retry a failed push).",
        "Upload an hf-glue output folder to a Hub repo, creating the repo (and --revision branch) if needed. The "
        "token comes from HF_TOKEN or `hf auth login`.\n\nExample:\n  hf-glue push merged --repo-id org/merged",
        PUSH_CONFIGS,
        push_command,
    ),
    "card": (
        "Regenerate the model card of an output folder from merge_result.json.",
        "Rewrite README.md (and the trajectory PNG) of an hf-glue output folder from its merge_result.json; with "
        "--compare, embed the table of an `hf-glue compare` run.\n\nExample:\n  hf-glue card merged --compare "
        "compare/compare.json",
        (),
        card_command,
    ),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from transformers import HfArgumentParser

    parser = argparse.ArgumentParser(
        prog="hf-glue",
        description="Gradient-free learning to unify experts (GLUE): merge fine-tuned checkpoints into one model "
        "for a new target domain.",
    )
    from importlib.metadata import version

    parser.add_argument("--version", action="version", version=f"hf-glue {version('hf-glue')}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=HfArgumentParser)
    parsers = {}
    for name, (help_text, description, configs, _) in COMMANDS.items():
        parsers[name] = _dataclass_parser(subparsers, name, help_text, description, configs)
    parsers["push"].add_argument("folder", help="The output folder to push (from hf-glue merge).")
    parsers["push"].add_argument("--repo-id", required=True, help="Target Hub repo, org/name.")
    parsers["card"].add_argument("folder", help="The output folder whose card to regenerate.")
    parsers["card"].add_argument("--compare", help="compare.json (or its folder) from `hf-glue compare` to embed.")
    return parser, parsers


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help/version/usage errors and exits
        parser.print_help()
        return 2
    name = argv[0]
    try:
        return COMMANDS[name][3](argv[1:], parsers[name])
    except GlueError as err:
        print(f"hf-glue {name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hf-glue {name}: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
