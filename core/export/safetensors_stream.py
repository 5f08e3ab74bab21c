"""A streaming safetensors writer: the header first (every tensor's name, dtype and shape is known
from the export plan), then tensor data appended one tensor at a time, hashed as it goes out.

The safetensors library writes only from a complete in-memory dict, which would hold every tensor
of a model at once; this writes the same format (8-byte little-endian header length, UTF-8 JSON
header ``{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [begin, end]}}`` padded
with spaces to a multiple of 8, then the data, contiguous and in header order), readable by
``safetensors.safe_open``. Tensors are stored in the order given, not sorted like the library does.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.export._common import ExportedFile, HashingWriter

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """What the header says about one tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """Length prefix + padded JSON header for `specs` stored in that order (the library's layout:
    compact JSON, ``__metadata__`` first)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for spec in specs:
        if spec.name in header or spec.name == "__metadata__":
            raise ValueError(f"duplicate tensor name {spec.name!r}")
        if spec.dtype not in DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} has no safetensors name")
        header[spec.name] = {
            "dtype": DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def plan_shards(sizes: Sequence[int], max_shard_bytes: int) -> list[list[int]]:
    """Hugging Face's rule, greedy and in order: start a new shard when the next item would push the
    current one past the limit; an item larger than the limit sits alone. Returns item indices."""
    shards: list[list[int]] = [[]]
    used = 0
    for k, size in enumerate(sizes):
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += size
    return shards


class SafetensorsStreamWriter:
    """Write `specs` to `path`: the header at once, then `write(name, tensor)` in the same order.

    Tensor bytes are written little-endian as the CPU holds them (every supported host is)."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: Mapping[str, str], name: str) -> None:
        self._specs = list(specs)
        self._next = 0
        self._name = name
        head = header_bytes(self._specs, metadata)
        self._out = HashingWriter(path)
        self._out.write(head)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_parts(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def write_parts(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], parts: Iterable[torch.Tensor]) -> None:
        """One planned tensor given as consecutive parts (e.g. slices of rows) of `dtype`, in order."""
        if self._next >= len(self._specs):
            raise ValueError(f"{name}: every planned tensor was already written")
        spec = self._specs[self._next]
        if (name, dtype, tuple(shape)) != (spec.name, spec.dtype, spec.shape):
            raise ValueError(f"expected {spec.name} {spec.dtype} {list(spec.shape)}, got {name} {dtype} {list(shape)}")
        written = 0
        for part in parts:
            if part.dtype != dtype:
                raise ValueError(f"{name}: a part of dtype {part.dtype}, planned {dtype}")
            data = part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._out.write(data)
            written += data.nbytes
        if written != spec.nbytes:
            raise ValueError(f"{name}: {written} bytes written, planned {spec.nbytes}")
        self._next += 1

    def close(self) -> ExportedFile:
        """Close the file; every planned tensor must have been written."""
        self._out.close()
        if self._next != len(self._specs):
            raise ValueError(f"{len(self._specs) - self._next} planned tensors were not written")
        return self._out.result(self._name)

    def abort(self) -> None:
        self._out.close()


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], name: str | None = None
) -> ExportedFile:
    """Write a complete dict in its iteration order (small files and tests)."""
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = SafetensorsStreamWriter(path, specs, metadata, name or Path(path).name)
    try:
        for key, value in tensors.items():
            writer.write(key, value)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
