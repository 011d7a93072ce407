"""The one-way run shared by the CLI and the Python API:

resolve → experts → target data → learn α → blend → (fine-tune) → save + card.
Every check that can fail on user input runs before weights are downloaded or loaded.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

import torch

from .tasks import data as data_mod
from .engine import memory
from .engine.matrix import ExpertMatrix, search_dtype
from . import tracking
from .config import (DataConfig, ExpertsConfig, FinetuneConfig, GlueConfig, OutputConfig, PushConfig, TrackingConfig,
                     torch_dtype)
from .errors import GlueError
from .io.checkpoint import STATE_FILE, Checkpoint, state_dir_for
from .io.hub import check_repo_id, refuse_missing_path
from .io.adapters import is_adapter
from .io.experts import (
    Expert,
    check_compatible,
    expert_from_repo,
    fetch_weights,
    read_through_transformers,
    resolve_experts,
    resolve_repos,
)
from .methods import MergeContext, check_method, get_method, method_info
from .methods.base import check_data_sizes, initial_alpha
from .methods.objective import Objective
from .methods.selection import Selection
from .io.output import check_free_space, check_output_dir, input_paths, output_bytes
from .report.result import MergeResult
from .tasks import Task, detect_task
from .tasks.base import fit_max_length
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
    #: the base the experts are deltas over (LoRA adapters, or task vectors with --combine), else None
    base: Optional[Expert] = None
    #: what the experts are: ``full`` checkpoints, LoRA ``adapters``, or ``task-vectors`` (full experts over base)
    kind: str = "full"
    #: the config.json the task reads (labels, lengths): the first expert's, or the base's as the adapters use it
    model_config: Optional[dict] = None
    #: the memory plan the run uses (`engine.memory.plans`): replicated, sharded, on-the-fly, offload-cpu/-disk, lora
    plan: Optional[memory.Plan] = None
    #: the train rows the searching methods choose their answer on: held apart from ``search`` (--validation-fraction)
    #: or, with --validation-fraction 0, some of the same rows
    validation: Any = None
    #: the train rows the searching methods draw batches from: ``train`` less ``validation``
    search: Any = None
    #: the seed the validation rows were drawn with (--seed at `prepare`; compare keeps them for every seed)
    validation_seed: int = 0

    def __post_init__(self) -> None:
        if self.model_config is None:
            self.model_config = self.experts[0].config
        if self.search is None:
            self.search = self.train

    @property
    def adapters(self) -> bool:
        """Whether the experts are LoRA adapters over `base` (the matrix is an `AdapterMatrix`)."""
        return self.kind == "adapters"

    @property
    def source_dir(self) -> Path:
        """Where the tokenizer/processor and config come from."""
        return (self.base or self.experts[0]).repo.path


def make_accelerator(cpu: bool = False, log_with: Optional[list] = None):
    """The run's `Accelerator`; ``log_with``: the experiment trackers the search logs to
    (`tracking.TrackingRun.search_trackers`)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    # even_batches=False: no rows repeated to pad the last batch (evaluation combines its sums once, after the loop)
    return Accelerator(cpu=cpu, dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=False),
                       log_with=log_with or None)


def prepare(
    experts_config: ExpertsConfig, data_config: DataConfig, glue_config: GlueConfig, accelerator=None,
    output_dir: Optional[str] = None, save_as: str = "merged", finetune: bool = False, whole: bool = False,
) -> Prepared:
    """Resolve and validate everything (``output_dir``'s free space too), then load weights into the engine the
    memory plan picks. ``finetune``: the blend is fine-tuned after (not sharded); ``whole``: callers that pass whole
    models to the template (compare's baselines, DARE masks redrawn per seed) need the replicated engine."""
    accelerator = accelerator or make_accelerator(experts_config.cpu)
    if glue_config.data_sizes is not None or glue_config.init == "data-size":
        check_data_sizes(glue_config, len(experts_config.experts))
    check_probe(experts_config, glue_config, accelerator.num_processes)
    for flag, size in (("--batch-size", glue_config.batch_size), ("--eval-batch-size", glue_config.eval_batch_size)):
        if size % accelerator.num_processes:
            raise GlueError(f"{flag} {size} must be divisible by the number of processes "
                            f"({accelerator.num_processes}).")
    check_local_inputs(experts_config, data_config)
    # 1. metadata only: repo ids, configs, tokenizers, parameter shapes
    with accelerator.main_process_first():
        repos = resolve_repos(experts_config.experts)
    is_adapter_repo = [is_adapter(r.path) for r in repos]
    if any(is_adapter_repo):
        if not all(is_adapter_repo):
            adapter = repos[is_adapter_repo.index(True)].spec
            full = repos[is_adapter_repo.index(False)].spec
            raise GlueError(f"{adapter!r} is a LoRA adapter but {full!r} is a full checkpoint: hf-glue merges either "
                            "adapters over one base or full experts, not a mix (yet); fold each adapter into its base "
                            "first with PEFT (PeftModel.from_pretrained(base, adapter).merge_and_unload()).")
        if glue_config.combine:
            raise GlueError(f"--combine {glue_config.combine} makes task vectors of full experts; LoRA adapters are "
                            "deltas already: drop --combine.")
        if experts_config.shard or experts_config.blend == "on-the-fly" or experts_config.offload != "none":
            raise GlueError("LoRA adapters blend as low-rank branches over one copy of the base (memory: the base "
                            "and the adapters): --shard, --blend on-the-fly and --offload apply to full experts.")
        return prepare_adapters(repos, experts_config, data_config, glue_config, accelerator, output_dir)
    if save_as == "adapter":
        raise GlueError("--save-as adapter is for LoRA experts; full experts merge into a full model.")
    experts = [expert_from_repo(r) for r in repos]
    base = None
    if glue_config.combine:
        base_spec = experts_config.base_model or card_base(experts)
        with accelerator.main_process_first():
            base = resolve_experts([base_spec], what="base model", minimum=1)[0]
    elif experts_config.base_model:
        raise GlueError("--base-model with full experts needs --combine task-arithmetic|ties|dare|dare-ties (the "
                        "experts as task vectors over it); without it they blend as they are.")
    task = detect_task(experts[0].config, data_config.task)
    data_config = fit_max_length(data_config, experts[0].config)
    module_shapes = check_compatible(experts, task.model_class(), experts_config.trust_remote_code)
    if base is not None:
        try:
            check_compatible([experts[0], base], task.model_class(), experts_config.trust_remote_code)
        except GlueError as err:
            raise GlueError(f"base model {base.name!r} does not match the experts ({err}); --combine needs the "
                            "checkpoint they were fine-tuned from, with the same architecture, task head and "
                            "tokenizer.") from None
    # 2. the target data and its columns
    with accelerator.main_process_first():
        target = data_mod.load_target(data_config, seed=glue_config.seed)
    check_search_rows(len(target.train), glue_config, accelerator.num_processes)
    columns = task.resolve_columns(target.column_names, data_config)
    target.check_cells(columns)
    # 3. weights (the long download), headers checked before any tensor is read
    inputs = experts + ([base] if base else [])
    with accelerator.main_process_first():
        fetch_weights(inputs, experts_config.allow_pickle)
    if any(name not in module_shapes for name in experts[0].tensors):  # transformers renames/fuses keys
        logger.info("checkpoint keys differ from %s's modules: reading experts through from_pretrained",
                    task.model_class().__name__)
        read_through_transformers(inputs, task.model_class(), experts_config.trust_remote_code)
    use_threads(experts, experts_config, accelerator)
    check_free_space(output_dir, output_bytes(experts[0].tensors.values(), torch_dtype(experts_config.dtype)))
    plan = check_memory(inputs, experts_config, data_config, glue_config, accelerator,
                        exclude=excluded_strategies(experts, experts_config, glue_config, finetune, whole))
    processor = task.load_processor(experts[0].repo.path, experts_config.trust_remote_code)
    with accelerator.main_process_first():
        train = task.preprocess(target.train, processor, columns, data_config, experts[0].config)
        held_out = task.preprocess(target.eval, processor, columns, data_config, experts[0].config)
    search, validation = carve_validation(train, glue_config)
    model, matrix = on_every_process(accelerator, lambda: build_engine(
        plan.strategy, experts, base, task, experts_config, glue_config, accelerator))
    objective = Objective(matrix, model, task, accelerator)
    return Prepared(experts, task, target, train, held_out, processor, matrix, model, objective, accelerator,
                    experts_config, data_config, base=base, kind="task-vectors" if base else "full", plan=plan,
                    validation=validation, search=search, validation_seed=glue_config.seed)


def use_threads(experts: list[Expert], experts_config: ExpertsConfig, accelerator) -> None:
    """On CPU, set the threads per process (`engine.threads`) and say so once."""
    if accelerator.device.type != "cpu":
        return
    import os

    from .engine.threads import apply_threads

    parameters = sum(t.numel for t in experts[0].tensors.values())
    line = apply_threads(experts_config.threads, parameters, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if accelerator.is_main_process:
        print(line, file=sys.stderr, flush=True)


def check_local_inputs(experts_config: ExpertsConfig, data_config: DataConfig) -> None:
    """Refuse, before any Hub lookup or download, an input that names a local path (``./x``, ``data/t.csv``) that
    does not exist: the run would otherwise resolve and fetch the others first."""
    inputs = [("dataset", data_config.dataset), ("base model", experts_config.base_model),
              *(("expert", e) for e in experts_config.experts)]
    for what, spec in inputs:
        if spec:
            refuse_missing_path(spec, what)


def check_probe(experts_config: ExpertsConfig, glue_config: GlueConfig, processes: int) -> None:
    """--select probe trains whole blends on one process, and scores them after on rows it did not train on:
    refused otherwise before anything is resolved."""
    if glue_config.select != "probe":
        return
    if not get_method(glue_config.method).selects:
        raise GlueError(f"--select probe chooses among a search's candidates; --method {glue_config.method} has none "
                        "(use glue, cma or nevergrad).")
    if processes > 1:
        raise GlueError(f"--select probe trains candidates on one process; this run has {processes}: run it as one "
                        "process, or choose by --select loss.")
    if experts_config.shard or experts_config.blend == "on-the-fly" or experts_config.offload != "none":
        raise GlueError("--select probe trains each candidate from its whole blend: drop --shard, --offload and "
                        "--blend on-the-fly, or choose by --select loss.")
    if glue_config.validation_fraction == 0:
        raise GlueError("--select probe trains on the search's rows, so it scores the candidates after training on "
                        "rows held apart: pass --validation-fraction (e.g. 0.25).")


def check_search_rows(rows: int, glue_config: GlueConfig, processes: int) -> None:
    """Refuse, before any weight is read, a train split too small for the validation rows and the search."""
    held = data_mod.validation_rows(rows, glue_config.validation_fraction)
    if glue_config.validation_fraction > 0 and held == 0:
        raise GlueError(f"the train split has {rows} row(s): too few to hold validation rows apart from the search; "
                        "add rows or pass --validation-fraction 0.")
    scored = held or min(rows, data_mod.MAX_VALIDATION_ROWS)
    if scored < processes:
        raise GlueError(f"the candidates would be scored on {scored} train row(s), fewer than the {processes} "
                        "processes (each needs one): add rows, raise --validation-fraction or use fewer processes.")
    if processes > 1 and glue_config.parallel == "data" and rows - held < glue_config.batch_size:
        # with fewer rows than one batch, a process could get an empty shard and leave the others waiting
        apart = f" ({held} of {rows} held apart for validation)" if held else ""
        raise GlueError(f"the search draws from {rows - held} train rows{apart}, fewer than --batch-size "
                        f"{glue_config.batch_size}: with {processes} processes use a --batch-size "
                        "of at most that many rows (divisible by the number of processes).")


def carve_validation(train, glue_config: GlueConfig) -> tuple[Any, Any]:
    """The preprocessed train rows as (the rows the search draws from, the rows candidates are scored on), drawn
    by --seed: --validation-fraction of them held apart, or with 0 every row for both (at most
    `MAX_VALIDATION_ROWS` of them scored)."""
    held = data_mod.validation_rows(len(train), glue_config.validation_fraction)
    if held:
        return data_mod.split_validation(train, held, glue_config.seed)
    if len(train) <= data_mod.MAX_VALIDATION_ROWS:
        return train, train
    return train, data_mod.split_validation(train, data_mod.MAX_VALIDATION_ROWS, glue_config.seed)[1]


def on_every_process(accelerator, build):
    """``build()`` on every process, failing on all of them when it fails on one: a process left waiting in the
    search's first collective (a NaN in another's shard, one device out of memory) would hang."""
    error = None
    try:
        result = build()
    except Exception as err:  # noqa: BLE001 — re-raised below, after the other processes have heard of it
        error, result = err, None
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        failed = [e for e in gather_object([None if error is None else f"process {accelerator.process_index}: "
                                            f"{error}"]) if e]
        if failed and error is None:
            raise GlueError(f"another process failed while loading the experts ({failed[0]}).")
    if isinstance(error, torch.cuda.OutOfMemoryError):
        raise GlueError(f"out of memory while loading the experts ({error}); see `hf-glue estimate`.") from None
    if error is not None:
        raise error
    return result


def excluded_strategies(experts: list[Expert], experts_config: ExpertsConfig, glue_config: GlueConfig,
                        finetune: bool, whole: bool) -> dict[str, str]:
    """The strategies this run cannot use, each with why (named in a refusal when the user asked for it)."""
    out = {}
    if whole:
        for name in memory.STRATEGIES[1:]:
            out[name] = "compare's --baselines, full-gradient and DARE masks redrawn per seed need the replicated " \
                        "engine"
    if glue_config.select == "probe":
        for name in memory.STRATEGIES[1:]:
            out[name] = "--select probe trains each candidate from its whole blend"
    if finetune:
        out["sharded"] = "the blend is fine-tuned after the search on one device (fine-tune a sharded model with " \
                         "your own FSDP Trainer setup from the saved blend)"
    if glue_config.combine:
        out["sharded"] = "--combine builds task vectors from whole tensors before the search (TIES/DARE trim, " \
                         "elect and mask them), and is not sharded yet"
        out["offload-disk"] = "--combine's task vectors are processed once, in memory"
    if any(e.loader is not None or any(i.file.suffix != ".safetensors" for i in e.tensors.values())
           for e in experts):
        out["offload-disk"] = "an expert is pickled or read through transformers, not plain safetensors"
    if any(e.loader is not None for e in experts):
        out["sharded"] = "an expert is read through transformers, whole, by every process"
    if experts and any(not i.shape for i in experts[0].tensors.values() if i.dtype.is_floating_point):
        out["sharded"] = "a scalar tensor in the checkpoint cannot be split across processes"
    return out


def blend_dtypes(expert: Expert, dtype: Optional[torch.dtype]) -> set:
    """The dtypes the experts' floating tensors are held in: ``dtype`` (--dtype), or each as stored."""
    return {dtype or i.dtype for i in expert.tensors.values() if i.dtype.is_floating_point}


def model_dtype(expert: Expert, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype the template and the blend use: the experts' one float dtype (or ``dtype``), float32 when mixed."""
    dtypes = blend_dtypes(expert, dtype)
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def build_engine(strategy: str, experts: list[Expert], base: Optional[Expert], task: Task,
                 experts_config: ExpertsConfig, glue_config: GlueConfig, accelerator):
    """The template model and the blending engine for ``strategy``: the expert matrix on the device (replicated);
    shards of it in an FSDP-sharded template (sharded); or on the device, in CPU memory or in the files, blended
    layer by layer inside the template (on-the-fly, offload-cpu, offload-disk)."""
    from .engine.onthefly import FileStore, OnTheFlyMatrix
    from .engine.sharded import ShardedMatrix, shard_model

    dtype = torch_dtype(experts_config.dtype)
    device = accelerator.device
    # the search's template runs in float32 for half-precision experts (`engine.matrix.search_dtype`)
    template_dtype = search_dtype(model_dtype(experts[0], dtype))
    model = build_model(experts[0], task, template_dtype, experts_config.trust_remote_code, device)
    granularity = glue_config.engine_granularity()
    if strategy == "sharded":
        shard_model(model, device, accelerator.num_processes)
        return model, ShardedMatrix(experts, model, granularity, dtype, device, accelerator.process_index,
                                    accelerator.num_processes)
    if strategy == "offload-disk":
        return model, OnTheFlyMatrix(FileStore(experts, granularity, dtype), model, device)
    where = torch.device("cpu") if strategy == "offload-cpu" else device
    if base is not None:
        start = glue_config.weights if glue_config.method == "weights" else \
            initial_alpha(glue_config, 1, len(experts))[0].tolist()
        store = ExpertMatrix.from_task_vectors(
            experts, base, glue_config.combine, density=glue_config.density, weights=start, seed=glue_config.seed,
            granularity=granularity, dtype=dtype, device=where)
    else:
        store = ExpertMatrix.from_experts(experts, granularity, dtype=dtype, device=where)
    if strategy == "replicated":
        return model, store
    return model, OnTheFlyMatrix(store, model, device, pin=strategy == "offload-cpu" and device.type == "cuda")


def card_base(experts: list[Expert]) -> str:
    """The base model the experts' model cards name (``base_model:`` in README.md), for --combine without
    --base-model; refused when a card names none or the cards disagree."""
    bases = {}
    for expert in experts:
        named = expert.repo.card_metadata().get("base_model")
        named = named[0] if isinstance(named, list) and len(named) == 1 else named
        if not isinstance(named, str):
            raise GlueError(f"--combine needs the experts' base model: pass --base-model (the model card of expert "
                            f"{expert.name!r} names no single base_model).")
        bases[expert.name] = named
    if len(set(bases.values())) > 1:
        listed = "; ".join(f"{n!r} over {b!r}" for n, b in bases.items())
        raise GlueError(f"the experts' model cards name different base models ({listed}); pass --base-model.")
    return next(iter(bases.values()))


def prepare_adapters(repos, experts_config: ExpertsConfig, data_config: DataConfig, glue_config: GlueConfig,
                     accelerator, output_dir: Optional[str]) -> Prepared:
    """`prepare` for LoRA adapters over one base: configs and shapes are checked against the base's config (and the
    adapters' small weight files) before the base's weights are downloaded; the base is loaded once."""
    from . import lora

    with accelerator.main_process_first():
        adapters, base, task, model_config = lora.resolve(repos, experts_config, data_config.task)
    data_config = fit_max_length(data_config, model_config)
    with accelerator.main_process_first():
        target = data_mod.load_target(data_config, seed=glue_config.seed)
    check_search_rows(len(target.train), glue_config, accelerator.num_processes)
    columns = task.resolve_columns(target.column_names, data_config)
    target.check_cells(columns)
    with accelerator.main_process_first():
        fetch_weights([base], experts_config.allow_pickle)
    use_threads([base], experts_config, accelerator)  # the base does the work; the adapters' factors are small
    check_free_space(output_dir, output_bytes(base.tensors.values(), torch_dtype(experts_config.dtype)))
    check_adapter_memory(base, adapters, experts_config, data_config, glue_config, accelerator)
    processor = task.load_processor(base.repo.path, experts_config.trust_remote_code)
    with accelerator.main_process_first():
        train = task.preprocess(target.train, processor, columns, data_config, model_config)
        held_out = task.preprocess(target.eval, processor, columns, data_config, model_config)
    search, validation = carve_validation(train, glue_config)
    model, matrix = lora.load(base, adapters, task, model_config, experts_config,
                              glue_config.engine_granularity(adapters=True),
                              accelerator.device)
    objective = Objective(matrix, model, task, accelerator)
    return Prepared(adapters, task, target, train, held_out, processor, matrix, model, objective, accelerator,
                    experts_config, data_config, base=base, kind="adapters", model_config=model_config,
                    validation=validation, search=search, validation_seed=glue_config.seed)


def check_adapter_memory(base: Expert, adapters, experts_config: ExpertsConfig, data_config: DataConfig,
                         glue_config: GlueConfig, accelerator) -> memory.Plan:
    """`check_memory` for adapters: the base once, the K adapters (float32, as PEFT holds them) and each blend's
    scaled copy of their factors."""
    adapter_bytes = 4 * sum(math.prod(s) for a in adapters for s in a.shapes.values())
    return check_memory([base], experts_config, data_config, glue_config, accelerator, blends=False,
                        extra_experts=adapter_bytes, extra_per_blend=adapter_bytes)


def memory_plans(experts: list[Expert], experts_config: ExpertsConfig, data_config: DataConfig,
                 glue_config: GlueConfig, processes: int, *, blends: bool = True, extra_experts: int = 0,
                 extra_per_blend: int = 0) -> dict[str, memory.Plan]:
    """Every memory strategy's estimate for this run, from file headers (or a meta model): ``experts`` are the
    rows held (K experts, plus the base for task vectors); ``blends``: a blend is a whole model's product (False
    for adapters, whose blends are ``extra_per_blend`` bytes each: one plan, ``lora``)."""
    dtype = torch_dtype(experts_config.dtype)
    layout = memory.Layout.of({i.name: (i.shape, i.dtype) for i in experts[0].tensors.values()
                               if i.dtype.is_floating_point}, dtype)
    parallel_batch = glue_config.batch_size if glue_config.parallel == "perturbation" else \
        glue_config.batch_size // processes
    models = get_method(glue_config.method).models_per_step(glue_config)
    probe = glue_config.select == "probe"
    if probe:  # after the search the probe trains a blend: it, its gradient and AdamW's two moments, with backward
        models = max(models, 3)
    plans = memory.plans(
        layout, len(experts), experts[0].config,
        # the blends a search holds at once: 2q for GLUE's step and the black-box generations, else one
        models_per_step=models if blends else 0,
        batch_per_process=max(parallel_batch, glue_config.eval_batch_size // processes),
        sequence_length=data_config.max_length,
        processes=processes,
        backward=glue_config.method == "full-gradient" or probe,
        perturbation=glue_config.parallel == "perturbation",
        widened=blends,  # full experts' blends are float32 for half precision; a PEFT base runs in its own dtype
    )
    if not blends:
        lora = plans.pop("replicated")
        lora.strategy = "lora"
        lora.memory.experts += extra_experts
        lora.memory.blends += models * extra_per_blend
        plans = {"lora": lora}
    return plans


def requested_strategies(experts_config: ExpertsConfig, processes: int) -> list[str]:
    """The strategies the flags allow (--blend, --shard, --offload); auto allows all."""
    if experts_config.shard:
        if processes < 2:
            raise GlueError("--shard splits the experts across processes, and this run has one: launch several "
                            "(torchrun --nproc_per_node N, or accelerate launch --num_processes N), or use "
                            "--blend on-the-fly on one device.")
        return ["sharded"]
    if experts_config.offload != "none":
        return [f"offload-{experts_config.offload}"]
    if experts_config.blend == "on-the-fly":
        return ["on-the-fly"]
    allowed = list(memory.STRATEGIES)
    if experts_config.blend == "materialized":
        allowed = ["replicated", "sharded"]
    if experts_config.shard is False:
        allowed.remove("sharded")
    return allowed


def check_memory(experts: list[Expert], experts_config: ExpertsConfig, data_config: DataConfig,
                 glue_config: GlueConfig, accelerator, *, blends: bool = True, extra_experts: int = 0,
                 extra_per_blend: int = 0, exclude: Optional[dict[str, str]] = None) -> memory.Plan:
    """Pick the fastest memory strategy the flags allow that fits the device (or --max-memory), before any tensor
    is read; refuse with concrete advice when none does. ``exclude``: strategies this run cannot use, and why."""
    processes = accelerator.num_processes
    device = accelerator.device
    plans = memory_plans(experts, experts_config, data_config, glue_config, processes, blends=blends,
                         extra_experts=extra_experts, extra_per_blend=extra_per_blend)
    candidates, exclude, allowed = strategy_candidates(plans, experts_config, glue_config, processes, exclude)
    if not candidates:
        name = allowed[0]
        raise GlueError(f"the {name} strategy is not available for this run: {exclude.get(name, 'not planned')}.")
    budget, host_budget = memory_budgets(experts_config.max_memory, device)
    if processes > 1:  # the smallest on any process: every process must pick the same strategy
        from accelerate.utils import gather_object

        budgets = gather_object([(budget, host_budget)])
        budget, host_budget = min(b for b, _ in budgets), min(h for _, h in budgets)
    plan = memory.choose(candidates, budget, host_budget, device.type)
    if plan is None:
        dtypes = blend_dtypes(experts[0], torch_dtype(experts_config.dtype))
        memory.refuse(candidates, budget, device=device, where="--max-memory" if experts_config.max_memory else
                      "the device", dtype_is_full=dtypes == {torch.float32}, samples=glue_config.spsa_samples,
                      processes=processes, excluded=set(exclude), others=plans)
    if plan.strategy not in ("replicated", "lora") and len(allowed) > 1 and accelerator.is_main_process:
        logger.warning("memory: the replicated search needs about %s, more than %.0f %% of %s; using the %s "
                       "strategy (%s); see `hf-glue estimate`", memory.human(plans["replicated"].memory.total),
                       100 * memory.HEADROOM, memory.human(budget), plan.strategy, plan.memory.describe())
    return plan


def strategy_candidates(plans: dict[str, memory.Plan], experts_config: ExpertsConfig, glue_config: GlueConfig,
                        processes: int, exclude: Optional[dict[str, str]] = None
                        ) -> tuple[dict[str, memory.Plan], dict[str, str], list[str]]:
    """The plans a run may pick from (allowed by the flags, not excluded), every exclusion with its reason, and the
    strategies the flags allow. Adapters have one plan, ``lora``."""
    exclude = dict(exclude or {})
    if glue_config.method == "full-gradient":
        for name in memory.STRATEGIES[1:]:
            exclude[name] = "--method full-gradient backpropagates through one whole blended model"
    allowed = ["lora"] if "lora" in plans else requested_strategies(experts_config, processes)
    return {n: p for n, p in plans.items() if n in allowed and n not in exclude}, exclude, allowed


def memory_budgets(max_memory: Optional[str], device: torch.device) -> tuple[int, int]:
    """Bytes one process may use on its device (--max-memory, or what is free; on the CPU, shared by the local
    processes) and in host memory (shared by the local processes)."""
    import os

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    host = memory.available(torch.device("cpu")) // local
    if max_memory:
        return memory.parse_size(max_memory), host
    return (host if device.type == "cpu" else memory.available(device)), host


def build_model(expert: Expert, task: Task, dtype: torch.dtype, trust_remote_code: bool = False,
                device: torch.device | str = "cpu") -> torch.nn.Module:
    """The template the blends are passed to: a model of the experts' class with its parameters on the meta
    device (no weights allocated: every parameter comes from a blend) and real buffers on ``device``
    (non-persistent ones, such as position ids or rotary frequencies, are computed at init and still needed).
    Refuses checkpoint tensors the class lacks and parameters the checkpoint lacks."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(expert.repo.path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = task.model_class().from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    model.tie_weights()  # from_config leaves meta parameters untied; functional_call(tie_weights=True) needs it
    model.eval()
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, buffer.to(device))
    provided = set(expert.tensors)
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


def batch_iterator(prep: Prepared, config: GlueConfig, rows=None):
    """Endless batches of ``rows`` (default: every train row): sharded across processes (data mode) or the same
    batch everywhere (perturbation)."""
    loader = data_mod.make_loader(prep.train if rows is None else rows, config.batch_size,
                                  prep.task.collator(prep.processor), shuffle=True, seed=config.seed)
    acc = prep.accelerator
    if config.parallel == "data":
        return data_mod.cycle(acc.prepare_data_loader(loader, device_placement=True))
    return (data_mod.to_device(b, acc.device) for b in data_mod.cycle(loader))


def eval_batches(prep: Prepared, config: GlueConfig, rows=None):
    """One pass over ``rows`` (default: the held-out split) in --eval-batch-size batches, split across processes."""
    loader = data_mod.make_loader(prep.eval if rows is None else rows, config.eval_batch_size,
                                  prep.task.collator(prep.processor), shuffle=False)
    if prep.accelerator.num_processes > 1:
        return prep.accelerator.prepare_data_loader(loader, device_placement=True)
    return (data_mod.to_device(b, prep.accelerator.device) for b in loader)


def validation_batches(prep: Prepared, config: GlueConfig):
    """One pass over the validation rows in batches whose first gives every process rows (a sharded run's forward
    passes are collective: a process that never had a batch would leave the others waiting)."""
    processes, rows = prep.accelerator.num_processes, len(prep.validation)
    size = min(config.eval_batch_size, max(processes, rows - rows % processes))
    return eval_batches(prep, replace(config, eval_batch_size=size), prep.validation)


def run_method(prep: Prepared, config: GlueConfig, checkpoint: Optional[Checkpoint] = None, tracker=None):
    """Run ``config.method`` on prepared inputs: its α and what it cost (a `MethodOutput`); ``tracker``: a
    `tracking.SearchTracker` each step is logged to."""
    method = get_method(config.method)
    selection = None
    if method.selects and prep.validation is not None:
        selection = Selection(prep.objective, lambda: validation_batches(prep, config), config,
                              prep.matrix, len(prep.validation), prep.validation_seed,
                              held_apart=config.validation_fraction > 0)
    ctx = MergeContext(
        matrix=prep.matrix,
        objective=prep.objective,
        # the searching methods never see the validation rows; the others (proxy) score every train row
        batches=batch_iterator(prep, config, prep.search if method.selects else None),
        config=config,
        accelerator=prep.accelerator,
        checkpoint=checkpoint,
        tracker=tracker,
        selection=selection,
    )
    out = method.run(ctx)
    if config.select == "probe" and selection is not None:
        probe_answer(prep, config, selection, out)
    return out


def with_probe_rate(config: GlueConfig, finetune: FinetuneConfig) -> GlueConfig:
    """--select probe trains at the fine-tuning --learning-rate unless --probe-learning-rate says otherwise."""
    if config.select == "probe" and config.probe_learning_rate is None:
        return replace(config, probe_learning_rate=finetune.learning_rate)
    return config


def probe_answer(prep: Prepared, config: GlueConfig, selection: Selection, out) -> None:
    """--select probe: replace the answer by the probe's choice among the best candidates (`methods.probe`), and
    count its passes and seconds in the method's cost."""
    import itertools

    from .methods.probe import probe

    prep.matrix.release()  # the search's product buffers: the probe holds a model, its gradient and AdamW's moments
    train = list(itertools.islice(batch_iterator(prep, config, prep.search), config.probe_steps))
    learning_rate = config.probe_learning_rate or FinetuneConfig().learning_rate
    chosen, record = probe(selection, prep.objective, train, lambda: validation_batches(prep, config),
                           config.probe_candidates, learning_rate)
    record["by_loss"] = out.details["selection"]["chosen"]
    out.details["selection"].update(select="probe", chosen=chosen.name)
    out.details["probe"] = record
    out.alpha = chosen.alpha.clone()
    out.forward_passes += record["forward_passes"]
    out.backward_passes += record["backward_passes"]
    out.seconds += record["seconds"]
    peak = memory.peak_memory_bytes(prep.matrix.device)  # since the method started: the probe's training included
    out.peak_memory_bytes = peak if out.peak_memory_bytes is None or peak is None else max(peak, out.peak_memory_bytes)


def search_checkpoint(prep: Prepared, config: GlueConfig, output_dir: str) -> Checkpoint:
    """The saved-state slot of a run writing ``output_dir``, keyed by everything that shapes its search."""
    fingerprint = {
        "experts": [[e.name, e.repo.revision] for e in prep.experts],
        "base": [prep.base.name, prep.base.repo.revision] if prep.base is not None else None,
        "dataset": prep.target.to_dict(),
        "data": asdict(prep.data_config),
        "dtype": prep.experts_config.dtype,
        "glue": {k: v for k, v in asdict(config).items() if k not in ("resume", "checkpoint_every")},
        "processes": prep.accelerator.num_processes,
    }
    return Checkpoint(state_dir_for(output_dir), fingerprint, config.checkpoint_every,
                      write=prep.accelerator.is_main_process)


def answer_granularity(prep: Prepared, config: GlueConfig, alpha: torch.Tensor) -> str:
    """The granularity a result reports: --granularity auto's answer is model-wide when every group has one α."""
    if config.granularity != "auto":
        return config.granularity
    if bool((alpha == alpha[:1]).all()):
        return "model"
    return config.engine_granularity(adapters=prep.kind == "adapters")


def to_result(prep: Prepared, config: GlueConfig, out, command: str = "") -> MergeResult:
    """Evaluate a method's α on the held-out split and package everything as a `MergeResult`."""
    metrics = prep.objective.evaluate(out.alpha, eval_batches(prep, config))
    out.details["eval_samples"] = metrics.pop("samples", 0)
    if prep.plan is not None:  # how the run held its experts (per process: all of them, or its shards)
        out.details["memory"] = {"strategy": prep.plan.strategy, "processes": prep.accelerator.num_processes}
        if hasattr(prep.matrix, "expert_bytes"):
            out.details["memory"]["expert_bytes_per_process"] = prep.matrix.expert_bytes()
    if getattr(prep.matrix, "task_vectors", None):
        out.details["task_vectors"] = prep.matrix.task_vectors  # what `hf-glue blend --from-result` re-applies
    matrix = prep.matrix
    granularity = answer_granularity(prep, config, out.alpha)
    return MergeResult(
        method=config.method,
        method_info=method_info(config.method),
        task=prep.task.name,
        granularity=granularity,
        experts=[{"name": e.name, **e.repo.to_dict()} for e in prep.experts],
        dataset=prep.target.to_dict(),
        coefficients=matrix.summarize(out.alpha),
        alpha=out.alpha,
        group_coefficients=matrix.by_group(out.alpha) if granularity != "model" else None,
        history=out.history,
        eval=metrics,
        forward_passes=out.forward_passes,
        backward_passes=out.backward_passes,
        seconds=out.seconds,
        peak_memory_bytes=out.peak_memory_bytes,
        command=command,
        versions=library_versions(get_method(config.method).packages + (("peft",) if prep.adapters else ())),
        config={"glue": asdict(config), "data": asdict(prep.data_config),
                "experts": {k: v for k, v in asdict(prep.experts_config).items() if k != "experts"}},
        details=out.details,
        processor=prep.processor,
        source_dir=prep.source_dir,
        base=({"name": prep.base.name, **prep.base.repo.to_dict()} if prep.base is not None else None),
    )


def learn(prep: Prepared, config: GlueConfig, command: str = "", checkpoint: Optional[Checkpoint] = None,
          tracker=None) -> MergeResult:
    """Run one method on prepared inputs and evaluate its blend on the held-out split (logged to ``tracker``)."""
    result = to_result(prep, config, run_method(prep, config, checkpoint, tracker), command)
    if tracker is not None:
        tracker.log_eval(result.eval, step=len(result.history))
    return result


def blended_model(prep: Prepared, alpha: torch.Tensor, consume: bool = False) -> torch.nn.Module:
    """A standalone model of the experts' class holding the exact θ(α) (for saving, fine-tuning, the API).

    The search's product buffers are freed first and the blended tensors are assigned, not copied, into a copy
    of the template, whose parameters are on the meta device: this needs θ(α) itself and nothing more. For LoRA
    experts: a `PeftModel` whose one adapter is the blend (``consume``: built from the search model's own base
    weights, which leaves nothing to search with; else from a copy).
    """
    if prep.adapters:
        base = prep.base.repo
        return prep.matrix.to_adapter_model(alpha, {"base_model_name_or_path": base.repo_id,
                                                    "revision": base.revision}, consume=consume)
    strategy = prep.plan.strategy if prep.plan is not None else "replicated"
    if strategy == "sharded":  # gathered whole into the main process's CPU memory; None on the others
        state = prep.matrix.materialize(alpha)
        if not prep.accelerator.is_main_process:
            return None
        model = build_model(prep.experts[0], prep.task, prep.matrix.model_dtype,
                            prep.experts_config.trust_remote_code, "cpu")
    else:
        prep.matrix.release()  # the product buffers, or the on-the-fly hooks
        state = prep.matrix.materialize(alpha)
        model = empty_model(prep)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # tied parameters absent from the checkpoint (e.g. an LM head) follow their source
    if strategy != "replicated":
        model.to("cpu")  # built beside the experts, which may fill the device: fine-tuning moves it back
    return model


def empty_model(prep: Prepared) -> torch.nn.Module:
    """A model of the experts' class in their dtype with its parameters on the meta device, to be given weights: a
    copy of the search's template (its buffers only), or a new one where the template runs in float32 for
    half-precision experts."""
    import copy

    if prep.matrix.search_dtype == prep.matrix.model_dtype:
        return copy.deepcopy(prep.model)
    return build_model(prep.experts[0], prep.task, prep.matrix.model_dtype, prep.experts_config.trust_remote_code,
                       prep.matrix.device)


def generation_eval(prep: Prepared, model, batch_size: int) -> dict[str, float]:
    """Held-out metrics of what a whole ``model`` generates, for tasks scored that way (seq2seq: exact match,
    token F1, ROUGE-L); ``{}`` for the others. Generation is no collective: it runs on the main process only (the
    one that saves and reports), and the others get ``{}``. Skipped after a sharded or on-the-fly search: the
    model is then gathered on the CPU, where generating the held-out split of a large model would take hours while
    the other processes wait."""
    if model is None or not prep.accelerator.is_main_process:
        return {}
    strategy = prep.plan.strategy if prep.plan is not None else "replicated"
    if strategy != "replicated":
        if type(prep.task).generation_metrics is not Task.generation_metrics:
            logger.warning("note: generation metrics skipped: after a %s search the merged model is on the CPU; "
                           "score it with the saved model instead.", strategy)
        return {}
    return prep.task.generation_metrics(model, prep.eval, prep.processor, batch_size,
                                        prep.data_config.max_length or 128) or {}


def finetune_result(prep: Prepared, result: MergeResult, config: FinetuneConfig, seed: int,
                    before: Optional[dict] = None, tracking: Optional[tracking.TrackingRun] = None
                    ) -> MergeResult:
    """Fine-tune ``result.model`` with the Trainer; records ``eval_before`` / ``eval_after`` (``before``: the
    start's held-out metrics, when already measured; ``tracking``: the trackers the Trainer logs to)."""
    from .finetune import finetune

    if prep.adapters:
        result.model = adapter_training_model(result.model, config.finetune_mode)
    result.model, result.eval_before, result.eval_after, result.finetune_curve = finetune(
        result.model, prep.task, prep.processor, prep.train, prep.eval, config, prep.model_config,
        seed=seed, cpu=prep.experts_config.cpu, before=before, tracking=tracking,
    )
    result.config["finetune"] = asdict(config)
    return result


def adapter_training_model(model, mode: str):
    """The blended adapter made trainable (``adapter``), or folded into the base for full fine-tuning (``full``)."""
    if mode == "full":
        return model.merge_and_unload().requires_grad_(True)  # the search froze the base
    model.base_model.set_adapter("default", inference_mode=False)  # the blend's factors and saved modules train
    return model


def output_model(model, save_as: str):
    """What is saved: a `PeftModel` as its adapter (``adapter``) or folded into the base (``merged``)."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and save_as == "merged":
        return model.merge_and_unload()
    return model


def run_merge(
    experts_config: ExpertsConfig,
    data_config: DataConfig,
    glue_config: GlueConfig,
    output_config: Optional[OutputConfig] = None,
    command: Optional[str] = None,
    finetune_config: Optional[FinetuneConfig] = None,
    push_config: Optional[PushConfig] = None,
    tracking_config: Optional[TrackingConfig] = None,
) -> MergeResult:
    """The whole `hf-glue merge`: validate, learn α, blend, (fine-tune), save atomically (main process only);
    with trackers (``tracking_config.report_to``) the search and the fine-tuning are logged as one run."""
    from .config import hub_environment, merge_command
    from .finetune import read_training_args

    output_config = output_config or OutputConfig()
    finetune_config = finetune_config or FinetuneConfig()
    tracking_config = tracking_config or TrackingConfig()
    check_method(glue_config.method)  # unknown method or a missing optional package: fail before any work
    glue_config = with_probe_rate(glue_config, finetune_config)
    if glue_config.method == "weights":
        from .methods.weights import check_weights

        check_weights(glue_config.weights, len(experts_config.experts),
                      glue_config.bounds if glue_config.space == "box" else None)
    read_training_args(finetune_config.training_args)  # a bad --training-args file too
    if output_config.output_dir:
        check_output_dir(output_config.output_dir, output_config.overwrite_output_dir,
                         input_paths(experts_config.experts, data_config.dataset))
        tracking.check_logging_dir(tracking_config, output_config.output_dir)
    if output_config.push_to_hub:
        if not output_config.output_dir:
            raise GlueError("--push-to-hub needs --output-dir: the local copy is kept (and used to retry a push).")
        check_repo_id(output_config.push_to_hub)
    if glue_config.resume:
        if glue_config.method != "glue":
            raise GlueError(f"--resume continues an interrupted GLUE search; --method {glue_config.method} has none.")
        if not output_config.output_dir or not (state_dir_for(output_config.output_dir) / STATE_FILE).is_file():
            raise GlueError("--resume: no saved search state for this --output-dir (it is written beside it every "
                            "--checkpoint-every steps and when a run is interrupted); run without --resume.")
    if output_config.save_as == "adapter" and finetune_config.finetune_epochs > 0 and \
            finetune_config.finetune_mode == "full":
        raise GlueError("--save-as adapter with --finetune-mode full: a fully fine-tuned model is no adapter; use "
                        "--save-as merged, or --finetune-mode adapter.")
    run = tracking.TrackingRun.from_config(tracking_config, output_config.output_dir)
    accelerator = make_accelerator(experts_config.cpu, run.search_trackers()) if run else None
    prep = prepare(experts_config, data_config, glue_config, accelerator, output_dir=output_config.output_dir,
                   save_as=output_config.save_as, finetune=finetune_config.finetune_epochs > 0)
    command = command or merge_command(experts_config, data_config, glue_config, finetune_config, output_config,
                                       tracking_config)
    if any(not e.repo.is_local for e in prep.experts) or prep.target.to_dict().get("revision"):
        command = hub_environment() + command  # the cache/offline/endpoint the repo ids were resolved with
    checkpoint = None
    if output_config.output_dir and glue_config.method == "glue":
        checkpoint = search_checkpoint(prep, glue_config, output_config.output_dir)
        if glue_config.resume:
            checkpoint.load()  # refuses a state saved with other inputs or settings, before the search
        elif checkpoint.exists() and prep.accelerator.is_main_process:
            logger.warning("an interrupted search for this output was saved in %s; pass --resume to continue it "
                           "(this run starts over and replaces it)", checkpoint.folder)
    tracker = None
    if run:
        tracker = tracking.SearchTracker(prep.accelerator)
        tracker.start({"experts": [e.name for e in prep.experts], "dataset": data_config.dataset, "run": run.run_name,
                       "glue": asdict(glue_config), "finetune": asdict(finetune_config)})
    try:
        result = learn(prep, glue_config, command, checkpoint, tracker)
        result.model = blended_model(prep, result.alpha, consume=True)
        prep.matrix.release(experts=True)  # nothing blends any more: K·N·b freed before fine-tuning and saving
        result.eval.update(generation_eval(prep, result.model, glue_config.eval_batch_size))
        if finetune_config.finetune_epochs > 0:
            finetune_result(prep, result, finetune_config, glue_config.seed, tracking=run)
            generated = generation_eval(prep, result.model, glue_config.eval_batch_size)
            if generated:  # the merged start's were measured above
                result.eval_before.update({k: result.eval[k] for k in generated if k in result.eval})
                result.eval_after.update(generated)
    finally:
        if tracker is not None:
            tracker.finish()  # flushes what was logged, also when the run fails
    if run:  # where to find the run's logs (merge_result.json and the printed summary say)
        result.details["tracking"] = run.summary()
    if prep.adapters:
        result.model = output_model(result.model, output_config.save_as)
        result.save_as = output_config.save_as
    result.model_name = output_config.push_to_hub
    if output_config.output_dir and prep.accelerator.is_main_process:
        result.save_pretrained(output_config.output_dir, overwrite=output_config.overwrite_output_dir)
    prep.accelerator.wait_for_everyone()
    if checkpoint is not None:
        checkpoint.remove()  # the output is complete: nothing left to resume
    if output_config.push_to_hub and prep.accelerator.is_main_process:
        from .io.hub import push_folder

        push = push_config or PushConfig()
        result.details["pushed_to"] = push_folder(
            Path(output_config.output_dir), output_config.push_to_hub, private=push.private,
            revision=push.revision, create_pr=push.create_pr, commit_message=push.commit_message,
        )
    return result
