"""`hf-glue blend`: apply known coefficients to the experts' files, streaming, without target data."""

from __future__ import annotations

import shlex

from ..config import BlendConfig, ExpertsConfig, OutputConfig, hub_environment
from .parsing import build_configs

HELP = "Write the blend for known coefficients, streaming from the experts' files (no data needed)."
DESCRIPTION = (
    "Apply coefficients — given with --weights, or an earlier merge's merge_result.json with --from-result — "
    "to the experts' safetensors and write the merged model, reading and writing one tensor at a time (memory "
    "stays near the size of the largest tensor).\n\nExamples:\n  hf-glue blend --experts org/a org/b "
    "--weights 0.7 0.3 --output-dir blended\n  hf-glue blend --from-result merged/merge_result.json "
    "--output-dir blended --dtype bfloat16"
)
CONFIGS = (ExpertsConfig, BlendConfig, OutputConfig)
#: shown without brackets in the usage (a --config file may give them instead)
NEEDED = ("output_dir",)


def run(args: list[str], parser) -> int:
    experts, blend, output, _ = build_configs(parser, CONFIGS, args)  # before the heavy imports: --help at once
    from ..blend_files import run_blend

    folder = run_blend(experts, blend, output, command=hub_environment() + shlex.join(["hf-glue", "blend", *args]))
    form = " (one LoRA adapter)" if output.save_as == "adapter" else ""
    print(f"Wrote the blend{form} to {folder}")
    return 0
