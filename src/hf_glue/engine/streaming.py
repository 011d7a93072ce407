"""The final blend straight from the experts' safetensors files into the output's, one tensor at a time.

Inputs are read without memory maps (`io.safetensors`), the sum is accumulated in float32, and output shards
are written tensor by tensor from a precomputed header, so peak memory is a few copies of the largest tensor,
not of the model.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from queue import Queue
from typing import Callable, Optional, Sequence

import torch

from ..errors import GlueError
from ..io.experts import Expert
from ..io.safetensors import SafetensorsReader, SafetensorsWriter, element_size


def blend_checkpoints(
    experts: Sequence[Expert],
    weights: Callable[[str], Sequence[float]],
    output_dir: Path,
    *,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = 5 * 10**9,
    transform: Optional[Callable[[str, list[torch.Tensor]], Sequence[torch.Tensor]]] = None,
) -> list[Path]:
    """Write Σ_k w_k(name) θ_k[name] for every floating tensor (non-floats from the first expert) as safetensors
    shards in ``output_dir`` (plus an index when sharded). ``weights(name)`` gives the K coefficients of a tensor;
    ``transform(name, tensors)``, when given, replaces a tensor's K inputs before they are summed (task vectors).
    A blended tensor holding NaN or inf is refused before it is written, naming its cause.
    """
    ref = experts[0]
    for expert in experts:
        if any(info.file.suffix != ".safetensors" for info in expert.tensors.values()):
            raise GlueError(f"expert {expert.name!r}: streaming blend reads safetensors only; convert its weights.")
    readers: dict[Path, SafetensorsReader] = {}

    def reader(path: Path) -> SafetensorsReader:
        if path not in readers:
            readers[path] = SafetensorsReader(path)
        return readers[path]

    # sequential reads: tensors in the first expert's file order
    infos = sorted(ref.tensors.values(), key=lambda i: (str(i.file), reader(i.file).header[i.name].start))
    layout = [(i.name, (dtype or i.dtype) if i.dtype.is_floating_point else i.dtype, i.shape) for i in infos]
    shards: list[list] = [[]]
    size = 0
    for entry in layout:
        nbytes = element_size(entry[1]) * max(1, math.prod(entry[2]))
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    # writes go to a background thread (file I/O releases the GIL), so reading and adding overlap writing,
    # which is what this is bound by; the bounded queue keeps at most two finished tensors in memory
    queue: Queue = Queue(maxsize=2)
    errors: list[BaseException] = []

    def write_all() -> None:
        while (item := queue.get()) is not None:
            target, tensor = item
            try:
                target.write(tensor) if tensor is not None else target.close()
            except BaseException as err:  # reported by the main thread
                errors.append(err)

    thread = threading.Thread(target=write_all, daemon=True)
    thread.start()
    written: list[Path] = []
    try:
        for shard_name, shard in zip(names, shards):
            writer = SafetensorsWriter(output_dir / shard_name, shard)
            for name, out_dtype, _ in shard:
                if errors:
                    raise errors[0]
                if not out_dtype.is_floating_point:
                    queue.put((writer, reader(ref.tensors[name].file).read(name)))
                    continue
                acc = None
                inputs = (reader(expert.tensors[name].file).read(name) for expert in experts)
                if transform is not None:
                    inputs = transform(name, list(inputs))
                for t, w in zip(inputs, weights(name)):
                    acc = t.to(torch.float32) * w if acc is None else acc.add_(t.to(torch.float32), alpha=w)
                out = acc.to(out_dtype)
                if not bool(torch.isfinite(out).all()):
                    raise GlueError(_non_finite(name, experts, reader, out_dtype, acc))
                queue.put((writer, out))
            queue.put((writer, None))  # close the shard
            written.append(writer.path)
    finally:
        queue.put(None)
        thread.join()
        for r in readers.values():
            r.close()
    if errors:
        raise errors[0]
    if len(shards) > 1:
        total = sum(p.stat().st_size for p in written)
        weight_map = {name: shard_name for shard_name, shard in zip(names, shards) for name, _, _ in shard}
        (output_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return written


def _non_finite(name: str, experts: Sequence[Expert], reader: Callable[[Path], SafetensorsReader],
                dtype: torch.dtype, acc: torch.Tensor) -> str:
    """Why the blend of tensor ``name`` is not finite: an expert's NaN/inf, an overflow of ``dtype``, or the
    coefficients."""
    for expert in experts:
        if not bool(torch.isfinite(reader(expert.tensors[name].file).read(name)).all()):
            return (f"expert {expert.name!r}: tensor {name!r} holds NaN or inf values; refusing to blend it "
                    "(nothing was written).")
    if bool(torch.isfinite(acc).all()):
        return (f"tensor {name!r} of the blend overflows {str(dtype).replace('torch.', '')}: choose a wider "
                "--dtype (nothing was written).")
    return f"the blend of tensor {name!r} is not finite: check the coefficients (nothing was written)."
