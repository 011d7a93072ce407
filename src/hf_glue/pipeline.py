"""The one-way run shared by the CLI and the Python API:

resolve → experts → target data → learn α → blend → (fine-tune) → save + card.
Every check that can fail on user input runs before weights are downloaded or loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from .tasks import data as data_mod
from .engine.matrix import ExpertMatrix
from .config import DataConfig, ExpertsConfig, FinetuneConfig, GlueConfig, OutputConfig, PushConfig, torch_dtype
from .errors import GlueError
from .io.hub import check_repo_id
from .io.experts import (
    Expert,
    check_compatible,
    fetch_weights,
    read_through_transformers,
    resolve_experts,
)
from .methods import MergeContext, get_method, method_info
from .methods.base import check_data_sizes
from .methods.objective import Objective
from .io.output import check_output_dir
from .report.result import MergeResult
from .tasks import Task, detect_task
from .versions import library_versions

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Resolved, validated inputs, loaded once and shared by every method (`merge`, `compare`)."""

    experts: list[Expert]
    task: Task
    target: data_mod.TargetData
    train: Any
    eval: Any
    processor: Any
    matrix: ExpertMatrix
    model: torch.nn.Module
    objective: Objective
    accelerator: Any
    experts_config: ExpertsConfig
    data_config: DataConfig


def make_accelerator(cpu: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(cpu=cpu, dataloader_config=DataLoaderConfiguration(split_batches=True))


def prepare(
    experts_config: ExpertsConfig, data_config: DataConfig, glue_config: GlueConfig, accelerator=None
) -> Prepared:
    """Resolve and validate everything, then load weights into the blending engine."""
    accelerator = accelerator or make_accelerator(experts_config.cpu)
    if glue_config.data_sizes is not None or glue_config.init == "data-size":
        check_data_sizes(glue_config, len(experts_config.experts))
    for flag, size in (("--batch-size", glue_config.batch_size), ("--eval-batch-size", glue_config.eval_batch_size)):
        if size % accelerator.num_processes:
            raise GlueError(f"{flag} {size} must be divisible by the number of processes "
                            f"({accelerator.num_processes}).")
    # 1. metadata only: repo ids, configs, tokenizers, parameter shapes
    with accelerator.main_process_first():
        experts = resolve_experts(experts_config.experts)
    task = detect_task(experts[0].config, data_config.task)
    module_shapes = check_compatible(experts, task.model_class(), experts_config.trust_remote_code)
    # 2. the target data and its columns
    with accelerator.main_process_first():
        target = data_mod.load_target(data_config, seed=glue_config.seed)
    columns = task.resolve_columns(target.column_names, data_config)
    # 3. weights (the long download), headers checked before any tensor is read
    with accelerator.main_process_first():
        fetch_weights(experts, experts_config.allow_pickle)
    if any(name not in module_shapes for name in experts[0].tensors):  # transformers renames/fuses keys
        logger.info("checkpoint keys differ from %s's modules: reading experts through from_pretrained",
                    task.model_class().__name__)
        read_through_transformers(experts, task.model_class(), experts_config.trust_remote_code)
    check_memory(experts, experts_config, data_config, glue_config, accelerator)
    processor = task.load_processor(experts[0].repo.path, experts_config.trust_remote_code)
    with accelerator.main_process_first():
        train = task.preprocess(target.train, processor, columns, data_config, experts[0].config)
        held_out = task.preprocess(target.eval, processor, columns, data_config, experts[0].config)
    dtype = torch_dtype(experts_config.dtype)
    matrix = ExpertMatrix.from_experts(experts, glue_config.granularity, dtype=dtype, device=accelerator.device)
    model = build_model(experts[0], task, matrix, experts_config.trust_remote_code).to(accelerator.device)
    objective = Objective(matrix, model, task, accelerator)
    return Prepared(experts, task, target, train, held_out, processor, matrix, model, objective, accelerator,
                    experts_config, data_config)


def check_memory(experts: list[Expert], experts_config: ExpertsConfig, data_config: DataConfig,
                 glue_config: GlueConfig, accelerator) -> None:
    """Refuse, before any tensor is read, a run whose estimated memory exceeds the device's (or --max-memory)."""
    from .engine import memory

    dtype = torch_dtype(experts_config.dtype)
    elements: dict[torch.dtype, int] = {}
    for info in experts[0].tensors.values():
        if info.dtype.is_floating_point:
            elements[dtype or info.dtype] = elements.get(dtype or info.dtype, 0) + info.numel
    parallel_batch = glue_config.batch_size if glue_config.parallel == "perturbation" else \
        glue_config.batch_size // accelerator.num_processes
    est = memory.estimate(
        elements, len(experts), experts[0].config,
        models_per_step=1 if glue_config.method == "full-gradient" else 2 * glue_config.spsa_samples,
        batch_per_process=max(parallel_batch, glue_config.eval_batch_size // accelerator.num_processes),
        sequence_length=data_config.max_length,
        backward=glue_config.method == "full-gradient",
    )
    budget = memory.parse_size(experts_config.max_memory) if experts_config.max_memory else \
        memory.available(accelerator.device)
    memory.check_fits(est, budget, device=accelerator.device,
                      dtype_is_full=all(dt == torch.float32 for dt in elements),
                      samples=glue_config.spsa_samples,
                      where="--max-memory" if experts_config.max_memory else "the device")


def build_model(expert: Expert, task: Task, matrix: ExpertMatrix, trust_remote_code: bool = False):
    """A model of the experts' class whose parameters the blends replace; refuses uncovered parameters."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(expert.repo.path, trust_remote_code=trust_remote_code)
    dtypes = {s.dtype for s in matrix.slots.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    model = task.model_class().from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    model.eval()
    provided = set(matrix.slots) | set(matrix.constants)
    state_keys = set(model.state_dict())
    unexpected = sorted(provided - state_keys)
    if unexpected:
        raise GlueError(f"expert {expert.name!r}: checkpoint tensor {unexpected[0]!r} is not a parameter of "
                        f"{type(model).__name__} ({len(unexpected)} such); was it saved by another model class?")
    missing = sorted(n for n, _ in model.named_parameters() if n not in provided)
    if missing:
        raise GlueError(f"expert {expert.name!r}: checkpoint lacks parameter {missing[0]!r} of "
                        f"{type(model).__name__} ({len(missing)} missing); it would be left at random init.")
    return model


def batch_iterator(prep: Prepared, config: GlueConfig):
    """Endless train batches: sharded across processes (data mode) or the same batch everywhere (perturbation)."""
    loader = data_mod.make_loader(prep.train, config.batch_size, prep.task.collator(prep.processor),
                                  shuffle=True, seed=config.seed)
    acc = prep.accelerator
    if config.parallel == "data":
        return data_mod.cycle(acc.prepare_data_loader(loader, device_placement=True))
    return (_to_device(b, acc.device) for b in data_mod.cycle(loader))


def eval_batches(prep: Prepared, config: GlueConfig):
    loader = data_mod.make_loader(prep.eval, config.eval_batch_size, prep.task.collator(prep.processor),
                                  shuffle=False)
    if prep.accelerator.num_processes > 1:
        return prep.accelerator.prepare_data_loader(loader, device_placement=True)
    return (_to_device(b, prep.accelerator.device) for b in loader)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def run_method(prep: Prepared, config: GlueConfig):
    """Run ``config.method`` on prepared inputs: its α and what it cost (a `MethodOutput`)."""
    ctx = MergeContext(
        matrix=prep.matrix,
        objective=prep.objective,
        batches=batch_iterator(prep, config),
        config=config,
        accelerator=prep.accelerator,
        )
    return get_method(config.method).run(ctx)


def to_result(prep: Prepared, config: GlueConfig, out, command: str = "") -> MergeResult:
    """Evaluate a method's α on the held-out split and package everything as a `MergeResult`."""
    metrics = prep.objective.evaluate(out.alpha, eval_batches(prep, config))
    matrix = prep.matrix
    return MergeResult(
        method=config.method,
        method_info=method_info(config.method),
        task=prep.task.name,
        granularity=config.granularity,
        experts=[{"name": e.name, **e.repo.to_dict()} for e in prep.experts],
        dataset=prep.target.to_dict(),
        coefficients=matrix.summarize(out.alpha),
        alpha=out.alpha,
        group_coefficients=matrix.by_group(out.alpha) if config.granularity != "model" else None,
        history=out.history,
        eval=metrics,
        forward_passes=out.forward_passes,
        backward_passes=out.backward_passes,
        seconds=out.seconds,
        peak_memory_bytes=out.peak_memory_bytes,
        command=command,
        versions=library_versions(),
        config={"glue": asdict(config), "data": asdict(prep.data_config),
                "experts": {k: v for k, v in asdict(prep.experts_config).items() if k != "experts"}},
        details=out.details,
        processor=prep.processor,
        source_dir=prep.experts[0].repo.path,
    )


def learn(prep: Prepared, config: GlueConfig, command: str = "") -> MergeResult:
    """Run one method on prepared inputs and evaluate its blend on the held-out split."""
    return to_result(prep, config, run_method(prep, config), command)


def blended_model(prep: Prepared, alpha: torch.Tensor) -> torch.nn.Module:
    """A standalone copy of the experts' model class holding θ(α) (for saving, fine-tuning, the API)."""
    import copy

    model = copy.deepcopy(prep.model)
    with torch.no_grad():
        params = prep.matrix.blend(alpha.to(prep.matrix.device, torch.float32))[0]
        model.load_state_dict(params, strict=False)
    return model


def finetune_result(prep: Prepared, result: MergeResult, config: FinetuneConfig, seed: int) -> MergeResult:
    """Fine-tune ``result.model`` with the Trainer; records ``eval_before`` / ``eval_after``."""
    from .finetune import finetune

    result.model, result.eval_before, result.eval_after = finetune(
        result.model, prep.task, prep.processor, prep.train, prep.eval, config, prep.experts[0].config,
        seed=seed, cpu=prep.experts_config.cpu,
    )
    result.config["finetune"] = asdict(config)
    return result


def run_merge(
    experts_config: ExpertsConfig,
    data_config: DataConfig,
    glue_config: GlueConfig,
    output_config: Optional[OutputConfig] = None,
    command: Optional[str] = None,
    finetune_config: Optional[FinetuneConfig] = None,
    push_config: Optional[PushConfig] = None,
) -> MergeResult:
    """The whole `hf-glue merge`: validate, learn α, blend, (fine-tune), save atomically (main process only)."""
    from .config import merge_command
    from .finetune import read_training_args

    output_config = output_config or OutputConfig()
    finetune_config = finetune_config or FinetuneConfig()
    get_method(glue_config.method)  # unknown method: fail before any work
    read_training_args(finetune_config.training_args)  # a bad --training-args file too
    if output_config.output_dir:
        check_output_dir(output_config.output_dir, output_config.overwrite_output_dir)
    if output_config.push_to_hub:
        if not output_config.output_dir:
            raise GlueError("--push-to-hub needs --output-dir: the local copy is kept (and used to retry a push).")
        check_repo_id(output_config.push_to_hub)
    prep = prepare(experts_config, data_config, glue_config)
    command = command or merge_command(experts_config, data_config, glue_config, finetune_config, output_config)
    result = learn(prep, glue_config, command)
    result.model = blended_model(prep, result.alpha)
    if finetune_config.finetune_epochs > 0:
        finetune_result(prep, result, finetune_config, glue_config.seed)
    result.model_name = output_config.push_to_hub
    if output_config.output_dir and prep.accelerator.is_main_process:
        result.save_pretrained(output_config.output_dir, overwrite=output_config.overwrite_output_dir)
    prep.accelerator.wait_for_everyone()
    if output_config.push_to_hub and prep.accelerator.is_main_process:
        from .io.hub import push_folder

        push = push_config or PushConfig()
        result.details["pushed_to"] = push_folder(
            Path(output_config.output_dir), output_config.push_to_hub, private=push.private,
            revision=push.revision, create_pr=push.create_pr, commit_message=push.commit_message,
        )
    return result
