"""safetensors files read and written tensor by tensor: one header parser, one dtype table.

Reads use plain ``readinto`` at a tensor's offset rather than memory maps (mapped pages would count in the
process's resident memory and blur every memory figure); writes stream tensors into a file whose header is
computed up front. Headers are validated like the reference implementation does, so a corrupt or truncated
file is refused by name before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
#: The largest header the reference implementation accepts (100 MB).
MAX_HEADER = 100_000_000


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read: the message says what is wrong with it."""


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor's dtype, shape and byte range (relative to the data section) in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> tuple[dict[str, HeaderEntry], int]:
    """The tensors of a safetensors file (in data order) and where its data section starts; validates offsets,
    dtypes and sizes against the file's length."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError("file is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER, size - 8):
            raise SafetensorsError(f"header length {length} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsError(f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    entries: dict[str, HeaderEntry] = {}
    for name, meta in header.items():
        try:
            dtype = NAME_DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            start, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"tensor {name!r} has a malformed or unsupported header entry {meta!r}") from None
        if any(d < 0 for d in shape) or not 0 <= start <= end <= data_size:
            raise SafetensorsError(f"tensor {name!r} lies outside the file (offsets {start}..{end} of {data_size})")
        if (end - start) != math.prod(shape) * element_size(dtype):
            raise SafetensorsError(f"tensor {name!r}: {end - start} bytes do not hold {dtype} {list(shape)}")
        entries[name] = HeaderEntry(dtype, shape, start, end)
    return dict(sorted(entries.items(), key=lambda kv: kv[1].start)), 8 + length


class SafetensorsReader:
    """Reads single tensors from a safetensors file by offset (no mmap)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.header, self.data_start = read_header(self.path)
        self.file = open(self.path, "rb")

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor ``name``, or only its rows ``[start, stop)`` along dim 0 (one contiguous byte range: a
        process of a sharded run reads its slice and nothing else)."""
        entry = self.header[name]
        shape, lo, hi = entry.shape, entry.start, entry.end
        if rows is not None and shape:
            row_bytes = (hi - lo) // shape[0] if shape[0] else 0
            lo, hi = lo + rows[0] * row_bytes, lo + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        buffer = torch.empty(hi - lo, dtype=torch.uint8)  # uninitialised: no zero-fill first
        if hi > lo:
            self.file.seek(self.data_start + lo)
            if self.file.readinto(buffer.numpy()) != hi - lo:
                raise SafetensorsError(f"{self.path.name}: tensor {name!r} is truncated")
        return buffer.view(entry.dtype).reshape(shape)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsWriter:
    """Writes a safetensors file whose tensors (names, dtypes, shapes, order) are known up front."""

    def __init__(self, path: Path, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        header, offset = {}, 0
        for name, dtype, shape in layout:
            size = element_size(dtype) * math.prod(shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
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
        if list(tensor.shape) != meta["shape"] or DTYPE_NAMES[tensor.dtype] != meta["dtype"]:
            raise ValueError(f"{name}: expected {meta['dtype']}{meta['shape']}, got {tensor.dtype}{list(tensor.shape)}")
        self.file.write(tensor.contiguous().view(torch.uint8).reshape(-1).numpy().data)
        self.index += 1

    def close(self) -> None:
        if self.index != len(self.expected):
            raise ValueError(f"only {self.index} of {len(self.expected)} tensors were written")
        self.file.close()
