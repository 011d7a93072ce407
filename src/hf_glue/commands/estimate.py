"""`hf-glue estimate`: memory per device and traffic per SPSA step of every strategy, before any download."""

from __future__ import annotations

import json

from ..config import EstimateConfig, ExpertsConfig
from .parsing import build_configs

HELP = "Estimate each memory strategy's needs for a merge from configs and file headers (no weights downloaded)."
DESCRIPTION = (
    "Print, for every memory strategy — replicated, sharded over the processes, on-the-fly, offloaded to CPU memory "
    "or disk, LoRA when the experts are adapters — the memory one device needs and the bytes an SPSA step moves, "
    "and which one `hf-glue merge` would pick. Reads the experts' config.json and safetensors headers, or builds "
    "the model on the meta device: nothing is loaded.\n\nExamples:\n  hf-glue estimate --experts org/a org/b "
    "org/c org/d --dtype bfloat16 --max-memory 80GiB\n  hf-glue estimate --experts org/a org/b --num-processes 8 "
    "--max-memory 80GiB --device cuda"
)
CONFIGS = (ExpertsConfig, EstimateConfig)
#: shown without brackets in the usage (a --config file may give them instead)
NEEDED = ("experts",)


def run(args: list[str], parser) -> int:
    experts, config, _ = build_configs(parser, CONFIGS, args)  # before the heavy imports: --help at once
    from ..plan import estimate_merge, format_estimate

    report = estimate_merge(experts, config)
    print(json.dumps(report, indent=2) if config.json else format_estimate(report))
    return 0
