"""Python API: `merge_experts` for scripts, and a `TrainerCallback` that starts a Trainer from the learned blend."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from .config import DataConfig, ExpertsConfig, GlueConfig, OutputConfig
from .result import MergeResult


def merge_experts(
    experts: Sequence[str],
    dataset: str,
    config: Optional[GlueConfig] = None,
    *,
    data_config: Optional[DataConfig] = None,
    experts_config: Optional[ExpertsConfig] = None,
    output_dir: Optional[str] = None,
    overwrite_output_dir: bool = False,
) -> MergeResult:
    """Learn α for ``experts`` on ``dataset`` and return the result; ``result.model`` is ready for `Trainer`.

    Args:
        experts (`Sequence[str]`): Hub repo ids (``org/name[@revision]``) or local folders, two or more.
        dataset (`str`): the target dataset: Hub repo id, local folder or data file.
        config (`GlueConfig`, *optional*): method and optimiser settings (defaults: GLUE, 100 SPSA steps).
        data_config (`DataConfig`, *optional*): splits and columns; its ``dataset`` is replaced by ``dataset``.
        experts_config (`ExpertsConfig`, *optional*): loading options; its ``experts`` are replaced by ``experts``.
        output_dir (`str`, *optional*): also save the merged model, card and ``merge_result.json`` there.
    """
    from .pipeline import run_merge

    experts_config = replace(experts_config or ExpertsConfig(), experts=list(experts))
    data_config = replace(data_config or DataConfig(), dataset=dataset)
    return run_merge(experts_config, data_config, config or GlueConfig(),
                     OutputConfig(output_dir=output_dir, overwrite_output_dir=overwrite_output_dir))
