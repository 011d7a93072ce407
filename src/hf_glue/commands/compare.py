"""`hf-glue compare`: every method (and every expert alone) on the same inputs, one table."""

from __future__ import annotations

from ..config import CompareConfig, DataConfig, ExpertsConfig, FinetuneConfig, GlueConfig
from .parsing import build_configs

HELP = "Compare GLUE with the baselines (and each expert alone) on the same inputs."
DESCRIPTION = (
    "Run several merge methods on the same resolved experts and target data — GLUE, uniform, data-size "
    "weighting, proxy selection, full-gradient mixing, and every expert alone — optionally fine-tune each "
    "result, and print a table of coefficients, target metrics (mean ± std over --seeds), passes, time and "
    "peak memory. Writes compare.json and compare.png to --output-dir.\n\nExample:\n  hf-glue compare "
    "--experts org/a org/b org/c --dataset org/target --data-sizes 1000 5000 2000 --seeds 0 1 2"
)
CONFIGS = (ExpertsConfig, DataConfig, GlueConfig, FinetuneConfig, CompareConfig)
#: shown without brackets in the usage (a --config file may give them instead)
NEEDED = ("experts", "dataset")


def run(args: list[str], parser) -> int:
    from ..errors import GlueError

    if any(a == "--method" or a.startswith("--method=") for a in args):  # GlueConfig's field, unused by compare
        raise GlueError("compare runs every method in --methods (plural); --method has no effect here.")
    experts, data, glue, finetune, compare, _ = build_configs(parser, CONFIGS, args)
    from ..compare import run_compare  # after parsing: --help and argument errors come at once

    run_compare(experts, data, glue, finetune, compare)
    return 0
