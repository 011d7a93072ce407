"""The target objective: loss (and metrics) of blended models on a batch, reduced across processes."""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from torch.func import functional_call

from ..engine.matrix import ExpertMatrix
from ..tasks import Task


class Objective:
    """Evaluates θ(α) for many α at once: one blend product, then one forward pass per α.

    Statistics are sums, all-reduced over processes, so a run on N processes sees the loss of the global
    batch exactly as one process would.
    """

    def __init__(self, matrix: ExpertMatrix, model: torch.nn.Module, task: Task, accelerator=None) -> None:
        self.matrix = matrix
        self.model = model
        self.task = task
        self.accelerator = accelerator
        self.forward_passes = 0
        #: blended buffers (e.g. batch-norm running statistics) enter the model as constants: no gradient flows
        #: through them, and batch norm refuses running statistics that require one
        self.buffer_names = {name for name, _ in model.named_buffers()}
        #: the engine's forward passes are collective (sharded): every process runs each one
        self.lockstep = getattr(matrix, "lockstep", False)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            return self.accelerator.reduce(t, reduction="sum")
        return t

    def stats(self, alphas: torch.Tensor, batch: dict, rounded: bool = False) -> list[dict[str, torch.Tensor]]:
        """Local (this process) batch sums for each coefficient set in ``alphas[M, G, K]`` (or one ``[G, K]``);
        ``rounded``: of the weights the saved model holds (rounded to the experts' dtype), not the search's."""
        # differentiable in alphas (the replicated engine)
        models = self.matrix.models(alphas.to(self.matrix.device, torch.float32), rounded=rounded)
        return [self.params_stats(params, batch) for params in models]

    def params_stats(self, params: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        """Local batch sums of the template model run with ``params`` (one forward pass)."""
        if torch.is_grad_enabled():
            params = {k: v.detach() if k in self.buffer_names else v for k, v in params.items()}
        if params:
            outputs = functional_call(self.model, params, args=(), kwargs=self.task.model_inputs(batch),
                                      tie_weights=True, strict=False)
        else:  # the engine forms θ(α) inside the model (sharded; on the fly with no constants to pass)
            outputs = self.model(**self.task.model_inputs(batch))
        self.forward_passes += 1
        return self.task.batch_stats(outputs, batch)

    @torch.no_grad()
    def losses(self, alphas: torch.Tensor, batch: dict, reduce: bool = True) -> torch.Tensor:
        """Mean loss of each blended model over the global batch (``reduce``: summed over processes) or over this
        process's batch: ``[M]``."""
        if not reduce and self.lockstep and self.accelerator is not None and self.accelerator.num_processes > 1:
            return self._own_losses(alphas, batch)
        stats = self.stats(alphas, batch)
        sums = torch.stack([s["loss_sum"] for s in stats] + [stats[0]["count"]])
        if reduce:
            sums = self._reduce(sums)
        return (sums[:-1] / sums[-1]).cpu()

    def _own_losses(self, alphas: torch.Tensor, batch: dict) -> torch.Tensor:
        """Perturbation-parallel on a sharded model: every process holds part of each model, so no process can
        run its own perturbations alone. All processes' coefficient sets are evaluated together, each on this
        process's share of the (shared) batch; the summed losses are those of the whole batch. Returns this
        process's ``[M]``, as an unsharded run would."""
        acc = self.accelerator
        alphas = alphas.unsqueeze(0) if alphas.dim() == 2 else alphas
        every = acc.gather(alphas.to(acc.device, torch.float64).unsqueeze(0))  # [P, M, G, K], rank order
        size = len(next(iter(batch.values())))
        share = torch.arange(size).tensor_split(acc.num_processes)[acc.process_index]
        mine = {k: v[share.to(v.device)] if torch.is_tensor(v) and v.dim() and len(v) == size else v
                for k, v in batch.items()}
        stats = self.stats(every.reshape(-1, *alphas.shape[1:]), mine)
        sums = self._reduce(torch.stack([s["loss_sum"] for s in stats] + [stats[0]["count"]]))
        return (sums[:-1] / sums[-1]).cpu().view(acc.num_processes, -1)[acc.process_index]

    def differentiable_loss(self, alpha: torch.Tensor, batch: dict) -> tuple[torch.Tensor, float]:
        """This process's share of the global mean loss of θ(α) (differentiable), and the global mean value.

        Summing the shares' gradients over processes gives the gradient of the global mean loss.
        """
        stats = self.stats(alpha, batch)[0]
        totals = self._reduce(torch.stack([stats["loss_sum"].detach(), stats["count"]]))
        return stats["loss_sum"] / totals[1], float(totals[0] / totals[1])

    @torch.no_grad()
    def features(self, alpha: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features (the input of the task's head) of θ(α) on a batch, and the batch labels."""
        head = self.task.head_module(self.model)
        captured = []
        handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.stats(alpha, batch)
        finally:
            handle.remove()
        features, labels = captured[0].float(), batch["labels"]
        if labels.dim() > 1:  # a label per token (token classification): each labelled token is a sample
            keep = labels != -100
            return features[keep].cpu(), labels[keep].cpu()
        return features.reshape(features.shape[0], -1).cpu(), labels.cpu()

    def evaluate(self, alpha: torch.Tensor, batches: Iterable[dict]) -> dict[str, float]:
        """Task metrics of θ(α) over all batches (e.g. the held-out split), plus ``samples``: the rows scored. The
        weights are the saved model's (rounded to the experts' dtype); half-precision experts run in float32."""
        return self._evaluate(lambda batch: self.stats(alpha, batch, rounded=True)[0], batches)

    def evaluate_params(self, params: dict[str, torch.Tensor], batches: Iterable[dict]) -> dict[str, float]:
        """Task metrics of the template model run with ``params`` (e.g. a baseline checkpoint, not a blend)."""
        return self._evaluate(lambda batch: self.params_stats(params, batch), batches)

    @torch.no_grad()
    def _evaluate(self, batch_stats, batches: Iterable[dict]) -> dict[str, float]:
        """Metrics from per-batch sums. Each row counts once: processes may hold different numbers of batches
        (no padding), so the sums are combined once, after the loop."""
        totals: dict[str, float] = {}
        rows = 0
        for batch in self._lockstep(batches, batch_stats) if self.lockstep else batches:
            if batch is None:  # this process ran out of batches: a forward pass the others need, not counted
                continue
            stats = batch_stats(batch)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            rows += len(next(iter(batch.values())))
        parts = self._gather_objects({"sums": totals, "rows": rows})
        totals = {}
        for part in parts:
            for k, v in part["sums"].items():
                totals[k] = totals.get(k, 0.0) + v
        if not totals:
            return {}
        metrics = {k: float(v) for k, v in self.task.finalize(totals).items()}
        metrics["samples"] = sum(part["rows"] for part in parts)
        return metrics

    def _lockstep(self, batches: Iterable[dict], batch_stats) -> Iterator[Optional[dict]]:
        """The batches, with every process running as many forward passes as the one holding the most (they are
        collective): before each, the processes tell each other whether they still have a batch; one that has
        run out re-runs its first, discards the result and yields None (not counted)."""
        from ..errors import GlueError

        batches, first = iter(batches), None
        while True:
            batch = next(batches, None)
            first = batch if first is None else first
            states = self._gather_objects((batch is not None, first is not None))
            if not any(has for has, _ in states):
                return
            if not all(ever for _, ever in states):
                raise GlueError(f"the held-out split leaves a process without a batch ({len(states)} processes); "
                                "a sharded run needs one on each: use fewer processes or a smaller "
                                "--eval-batch-size.")
            if batch is None:
                batch_stats(first)
            yield batch

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's rows of ``t`` in rank order (sizes may differ), on the CPU."""
        return torch.cat([p for p in self._gather_objects(t.cpu())])

    def _gather_objects(self, obj) -> list:
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])
