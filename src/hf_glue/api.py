"""Python API: `merge_experts` for scripts, and a `TrainerCallback` that starts a Trainer from the learned blend."""

from __future__ import annotations

import logging

from dataclasses import replace
from typing import Optional, Sequence

from transformers import TrainerCallback

from .config import DataConfig, ExpertsConfig, FinetuneConfig, GlueConfig, OutputConfig, TrackingConfig
from .report.result import MergeResult


logger = logging.getLogger(__name__)


def merge_experts(
    experts: Sequence[str],
    dataset: str,
    config: Optional[GlueConfig] = None,
    *,
    data_config: Optional[DataConfig] = None,
    experts_config: Optional[ExpertsConfig] = None,
    output_dir: Optional[str] = None,
    overwrite_output_dir: bool = False,
    finetune_config: Optional[FinetuneConfig] = None,
    tracking_config: Optional[TrackingConfig] = None,
) -> MergeResult:
    """Learn α for ``experts`` on ``dataset`` and return the result; ``result.model`` is ready for `Trainer`.

    Args:
        experts (`Sequence[str]`): Hub repo ids (``org/name[@revision]``) or local folders, two or more.
        dataset (`str`): the target dataset: Hub repo id, local folder or data file.
        config (`GlueConfig`, *optional*): method and optimiser settings (defaults: GLUE, 100 SPSA steps).
        data_config (`DataConfig`, *optional*): splits and columns; its ``dataset`` is replaced by ``dataset``.
        experts_config (`ExpertsConfig`, *optional*): loading options; its ``experts`` are replaced by ``experts``.
        output_dir (`str`, *optional*): also save the merged model, card and ``merge_result.json`` there.
        finetune_config (`FinetuneConfig`, *optional*): fine-tune the merged model with the Trainer afterwards.
        tracking_config (`TrackingConfig`, *optional*): experiment trackers the search and fine-tuning log to.
    """
    import torch

    from .pipeline import run_merge

    experts_config = replace(experts_config or ExpertsConfig(), experts=list(experts))
    data_config = replace(data_config or DataConfig(), dataset=dataset)
    threads = torch.get_num_threads()  # the run chooses its CPU threads; the caller's setting comes back after
    try:
        return run_merge(experts_config, data_config, config or GlueConfig(),
                         OutputConfig(output_dir=output_dir, overwrite_output_dir=overwrite_output_dir),
                         finetune_config=finetune_config, tracking_config=tracking_config)
    finally:
        torch.set_num_threads(threads)


class GlueCallback(TrainerCallback):
    """A `transformers.TrainerCallback` that starts training from the GLUE blend of ``experts``.

    At ``on_train_begin`` it learns α on ``dataset`` (or takes a ready ``result``) and copies θ(α) into the
    Trainer's model in place, so an existing fine-tune script gains GLUE with one line::

        trainer = Trainer(model=model, ..., callbacks=[GlueCallback(["org/a", "org/b"], "org/target")])

    The model must have the experts' architecture; after training, ``callback.result`` holds α for the card. A run
    resumed from a checkpoint (``trainer.train(resume_from_checkpoint=...)``) continues from the checkpoint's
    weights: the callback neither blends nor searches again (``callback.result`` is then the ``result=`` given, if
    any).
    """

    def __init__(
        self,
        experts: Optional[Sequence[str]] = None,
        dataset: Optional[str] = None,
        config: Optional[GlueConfig] = None,
        *,
        data_config: Optional[DataConfig] = None,
        experts_config: Optional[ExpertsConfig] = None,
        result: Optional[MergeResult] = None,
    ) -> None:
        if result is None and (not experts or not dataset):
            raise ValueError("GlueCallback needs experts and dataset, or a ready result=.")
        self.experts, self.dataset, self.config = experts, dataset, config
        self.data_config, self.experts_config = data_config, experts_config
        self.result = result

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        from .errors import GlueError

        if getattr(state, "global_step", 0) > 0:
            # resumed: the Trainer loaded the checkpoint's weights (θ(α) trained so far) before this event; the blend
            # would overwrite them and the search would run again
            if self.result is None:
                logger.warning("GlueCallback: resumed at step %d from a checkpoint, so no search ran in this process "
                               "and callback.result is None; pass result= (the first run's MergeResult) to keep "
                               "its α for the card.", state.global_step)
            return control
        if self.result is None:
            self.result = merge_experts(self.experts, self.dataset, self.config, data_config=self.data_config,
                                        experts_config=self.experts_config)
        blended = self.result.model.state_dict()
        target = model.state_dict()
        mismatched = [k for k, v in blended.items() if k not in target or target[k].shape != v.shape]
        if mismatched:
            raise GlueError(f"GlueCallback: the Trainer's model ({type(model).__name__}) does not match the experts' "
                            f"architecture (first difference: {mismatched[0]!r}).")
        with torch.no_grad():
            for name, tensor in blended.items():
                target[name].copy_(tensor)  # in place: the optimizer keeps its parameter references
        return control
