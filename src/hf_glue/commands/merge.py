"""`hf-glue merge`: learn α on the target data, blend, optionally fine-tune, save (and push)."""

from __future__ import annotations

import shlex
from typing import Optional

from ..config import DataConfig, ExpertsConfig, FinetuneConfig, GlueConfig, OutputConfig, PushConfig
from ..errors import GlueError
from .parsing import build_configs

HELP = "Learn merge coefficients on target data and save the merged model."
DESCRIPTION = (
    "Merge fine-tuned experts of one architecture into one model for a target dataset: α is learned with "
    "two-point SPSA (GLUE), the experts are blended as θ = Σ α_k θ_k, and the model, tokenizer, model card "
    "and merge_result.json are written to --output-dir.\n\nExample:\n  hf-glue merge --experts org/a org/b "
    "--dataset org/target --output-dir merged --steps 100"
)
CONFIGS = (ExpertsConfig, DataConfig, GlueConfig, FinetuneConfig, OutputConfig, PushConfig)


def run(args: list[str], parser) -> int:
    from ..pipeline import run_merge

    experts, data, glue, finetune, output, push, _ = build_configs(parser, CONFIGS, args)
    if not output.output_dir:
        raise GlueError("no output folder: pass --output-dir DIR.")
    result = run_merge(experts, data, glue, output, command=shlex.join(["hf-glue", "merge", *args]),
                       finetune_config=finetune, push_config=push)
    if is_main_process():
        print_summary(result, output.output_dir)
    return 0


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def print_summary(result, output_dir: Optional[str]) -> None:
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
