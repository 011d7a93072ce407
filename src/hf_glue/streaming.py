"""The final blend straight from the experts' safetensors files into the output's, one tensor at a time.

Inputs are read with plain file reads rather than memory maps (mapped pages would count in the process's
resident memory), the sum is accumulated in float32, and output shards are written tensor by tensor from
a precomputed header, so peak memory is a few copies of the largest tensor, not of the model.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from pathlib import Path
from queue import Queue
from typing import Callable, Optional, Sequence

import torch

from .errors import GlueError
from .experts import Expert

_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


class SafetensorsReader:
    """Reads single tensors from a safetensors file by offset (no mmap)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = open(self.path, "rb")
        (length,) = struct.unpack("<Q", self.file.read(8))
        self.header = json.loads(self.file.read(length))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + length

    def read(self, name: str) -> torch.Tensor:
        meta = self.header[name]
        start, end = meta["data_offsets"]
        dtype = _NAME_DTYPES[meta["dtype"]]
        buffer = torch.empty(end - start, dtype=torch.uint8)  # uninitialised: no zero-fill before the read
        if end > start:
            self.file.seek(self.data_start + start)
            self.file.readinto(buffer.numpy())
        return buffer.view(dtype).reshape(meta["shape"])

    def close(self) -> None:
        self.file.close()


class SafetensorsWriter:
    """Writes a safetensors file whose tensors (names, dtypes, shapes, order) are known up front."""

    def __init__(self, path: Path, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        header, offset = {}, 0
        for name, dtype, shape in layout:
            size = torch.empty((), dtype=dtype).element_size() * math.prod(shape)
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.expected = [(name, header[name]) for name, _, _ in layout]
        self.path = Path(path)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.index = 0

    def write(self, tensor: torch.Tensor) -> None:
        name, meta = self.expected[self.index]
        if list(tensor.shape) != meta["shape"] or _DTYPE_NAMES[tensor.dtype] != meta["dtype"]:
            raise ValueError(f"{name}: expected {meta['dtype']}{meta['shape']}, got {tensor.dtype}{list(tensor.shape)}")
        self.file.write(tensor.contiguous().view(torch.uint8).reshape(-1).numpy().data)
        self.index += 1

    def close(self) -> None:
        if self.index != len(self.expected):
            raise ValueError(f"only {self.index} of {len(self.expected)} tensors were written")
        self.file.close()


def blend_checkpoints(
    experts: Sequence[Expert],
    weights: Callable[[str], Sequence[float]],
    output_dir: Path,
    *,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = 5 * 10**9,
) -> list[Path]:
    """Write Σ_k w_k(name) θ_k[name] for every floating tensor (non-floats from the first expert) as safetensors
    shards in ``output_dir`` (plus an index when sharded). ``weights(name)`` gives the K coefficients of a tensor.
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
    infos = sorted(ref.tensors.values(), key=lambda i: (str(i.file), reader(i.file).header[i.name]["data_offsets"][0]))
    layout = [(i.name, (dtype or i.dtype) if i.dtype.is_floating_point else i.dtype, i.shape) for i in infos]
    shards: list[list] = [[]]
    size = 0
    for entry in layout:
        nbytes = torch.empty((), dtype=entry[1]).element_size() * max(1, math.prod(entry[2]))
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
                for expert, w in zip(experts, weights(name)):
                    t = reader(expert.tensors[name].file).read(name)
                    acc = t.to(torch.float32) * w if acc is None else acc.add_(t.to(torch.float32), alpha=w)
                queue.put((writer, acc.to(out_dtype)))
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
