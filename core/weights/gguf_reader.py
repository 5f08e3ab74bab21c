"""GGUF checkpoints read tensor by tensor: header parsed with positioned reads, data dequantized
with gguf-py, then transformers' own per-architecture processing, so `read` returns what
`from_pretrained(..., gguf_file=...)` puts into the parameter.

The header is parsed here rather than with `gguf.GGUFReader`: that reader memory-maps the whole
file and, on a truncated file, fails with a bare numpy reshape error instead of naming the tensor.
The config handed to transformers' tensor processors is built from the same metadata with
transformers' own GGUF_CONFIG_MAPPING table, as `load_gguf_checkpoint` builds it
(core.weights.gguf_transformers).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape
from torch import nn

from core.errors import ModelInvalid, UnsupportedModel
from core.weights import (
    CheckpointSummary,
    TensorInfo,
    WeightReader,
    open_model_file,
    pread_exact,
)
from core.weights.gguf_transformers import hf_weights_map, tensor_processor

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 16 << 20  # far above any real key, name or chat template; guards corrupt lengths
MAX_ARRAY_DEPTH = 4
WINDOW = 1 << 20  # header bytes fetched per pread

# GGUF metadata value types (gguf.GGUFValueType) -> struct format
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4

# Types gguf-py has no dequantizer for but that are plain numpy arrays (transformers cannot load them).
_PLAIN = {
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensorHeader:
    name: str  # GGUF name, e.g. "blk.3.attn_q.weight"
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy / HF order: GGUF dims reversed
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, object]  # scalars and strings; arrays (vocabularies) are skipped
    tensors: list[GGUFTensorHeader]
    data_start: int


class _Cursor:
    """Sequential reader over the header with bounded windows of positioned reads."""

    def __init__(self, fd: int, size: int, file: str) -> None:
        self.fd, self.size, self.file = fd, size, file
        self.pos, self._at, self._buf = 0, 0, b""

    def corrupt(self, why: str) -> ModelInvalid:
        return ModelInvalid(f"{self.file} has a corrupt GGUF header: {why}", details={"file": self.file})

    def _window(self, n: int) -> int:
        if n > self.size - self.pos:
            raise self.corrupt(f"it runs past the end of the file at byte {self.pos} (truncated?)")
        rel = self.pos - self._at
        if rel + n > len(self._buf):
            want, parts, got = max(n, WINDOW), [], 0
            while got < n:
                chunk = os.pread(self.fd, want - got, self.pos + got)
                if not chunk:
                    raise self.corrupt("the file shrank while it was read")
                parts.append(chunk)
                got += len(chunk)
            self._buf, self._at, rel = b"".join(parts), self.pos, 0
        return rel

    def unpack(self, fmt: str) -> object:
        size = struct.calcsize(fmt)
        rel = self._window(size)
        self.pos += size
        return struct.unpack_from(fmt, self._buf, rel)[0]

    def uint(self, fmt: str) -> int:
        """An unsigned integer field (``<I``, ``<Q``)."""
        return cast(int, self.unpack(fmt))

    def skip(self, n: int) -> None:
        if n > self.size - self.pos:
            raise self.corrupt(f"it runs past the end of the file at byte {self.pos} (truncated?)")
        self.pos += n

    def string(self) -> bytes:
        n = self.uint("<Q")
        if n > MAX_STRING:
            raise self.corrupt(f"a string of {n} bytes at byte {self.pos - 8}")
        rel = self._window(n)
        self.pos += n
        return self._buf[rel : rel + n]

    def text(self, what: str) -> str:
        try:
            return self.string().decode("utf-8")
        except UnicodeDecodeError:
            raise self.corrupt(f"{what} is not UTF-8") from None

    def value(self, vtype: int, depth: int = 0) -> object:
        """A metadata value; arrays are skipped (None): only scalars are needed here."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string().decode("utf-8", errors="replace")
        if vtype != _ARRAY or depth >= MAX_ARRAY_DEPTH:
            raise self.corrupt(f"unknown metadata value type {vtype}")
        etype, count = self.uint("<I"), self.uint("<Q")
        if etype in _SCALARS:
            self.skip(count * struct.calcsize(_SCALARS[etype]))
            return None
        if count * 8 > self.size - self.pos:  # every string or array element takes 8+ bytes
            raise self.corrupt(f"an array of {count} elements longer than the file")
        for _ in range(count):
            if etype == _STRING:
                n = self.uint("<Q")
                self.skip(n)
            else:
                self.value(etype, depth + 1)
        return None


def parse_gguf_header(fd: int, size: int, file: str) -> GGUFHeader:
    """Metadata scalars and the validated tensor index of a GGUF file (ModelInvalid otherwise)."""
    cur = _Cursor(fd, size, file)
    if size < 24 or os.pread(fd, 4, 0) != GGUF_MAGIC:
        raise ModelInvalid(f"{file} is not a GGUF file", details={"file": file})
    cur.skip(4)
    version = cur.uint("<I")
    if version & 0xFFFF == 0 and version:
        raise UnsupportedModel(f"{file} is a big-endian GGUF file, which is not supported", details={"file": file})
    if version == 1:
        raise UnsupportedModel(f"{file} is a GGUF version 1 file, which is not supported", details={"file": file})
    if version not in (2, 3):
        raise cur.corrupt(f"unknown GGUF version {version}")
    n_tensors, n_kv = cur.uint("<Q"), cur.uint("<Q")
    if n_kv * 13 > size or n_tensors * 24 > size:  # minimum sizes of one entry of each
        raise cur.corrupt(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in the file (truncated?)")

    metadata: dict[str, object] = {}
    types: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.text("a metadata key")
        if key in metadata:
            raise cur.corrupt(f"metadata key {key!r} appears twice")
        types[key] = vtype = cur.uint("<I")
        metadata[key] = cur.value(vtype)

    raw: list[tuple[str, list[int], int, int]] = []
    for _ in range(n_tensors):
        name = cur.text("a tensor name")
        n_dims = cur.uint("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.corrupt(f"tensor {name} has {n_dims} dimensions")
        dims = [cur.uint("<Q") for _ in range(n_dims)]
        raw.append((name, dims, cur.uint("<I"), cur.uint("<Q")))

    # an int unless it has another type, which the check refuses before any arithmetic
    alignment = cast(int, metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if "general.alignment" in metadata and (
        types["general.alignment"] != _UINT32 or alignment == 0 or alignment & (alignment - 1)
    ):
        raise cur.corrupt(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    return GGUFHeader(version, metadata, _check_tensors(raw, data_start, alignment, size, file), data_start)


def _check_tensors(
    raw: list[tuple[str, list[int], int, int]], data_start: int, alignment: int, size: int, file: str
) -> list[GGUFTensorHeader]:
    def bad(name: str, why: str) -> ModelInvalid:
        return ModelInvalid(f"tensor {name} in {file} {why}", details={"file": file, "tensor": name})

    tensors: list[GGUFTensorHeader] = []
    seen: set[str] = set()
    for name, dims, type_id, offset in raw:
        if name in seen:
            raise bad(name, "appears twice")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise bad(name, f"has unknown tensor type {type_id}") from None
        if dims[0] % block:
            raise bad(name, f"has rows of {dims[0]} elements, not a multiple of the {qtype.name} block ({block})")
        if offset % alignment:
            raise bad(name, f"starts at offset {offset}, not a multiple of the alignment {alignment}")
        nbytes = math.prod(dims) // block * type_size
        tensors.append(GGUFTensorHeader(name, qtype, tuple(reversed(dims)), data_start + offset, nbytes))
    ordered = sorted(tensors, key=lambda t: (t.offset, t.nbytes))
    for t in ordered:
        if t.offset + t.nbytes > size:
            raise ModelInvalid(
                f"tensor {t.name} lies past the end of {file} (truncated?)", details={"file": file, "tensor": t.name}
            )
    for before, after in zip(ordered, ordered[1:]):
        if after.offset < before.offset + before.nbytes:
            raise bad(after.name, f"overlaps tensor {before.name}")
    return tensors


def summarize_gguf(directory: Path, name: str, root: Path) -> CheckpointSummary:
    fd, size = open_model_file(directory, name, root, "GGUF file")
    try:
        header = parse_gguf_header(fd, size, name)
    finally:
        os.close(fd)
    dtypes: dict[str, int] = {}
    for t in header.tensors:
        dtypes[t.qtype.name] = dtypes.get(t.qtype.name, 0) + 1
    return CheckpointSummary(
        files=1, tensors=len(header.tensors), total_bytes=sum(t.nbytes for t in header.tensors), dtypes=dtypes
    )


class GGUFWeightReader(WeightReader):
    """One GGUF file; HF names from transformers' name map over `skeleton` (a meta-device model)."""

    def __init__(self, directory: Path, name: str, skeleton: nn.Module, root: Path) -> None:
        self._fd: int | None = None
        fd, size = open_model_file(directory, name, root, "GGUF file")
        try:
            header = parse_gguf_header(fd, size, name)
            arch = header.metadata.get("general.architecture")
            if not isinstance(arch, str):
                raise ModelInvalid(f"{name} has no general.architecture", details={"file": name})
            self._processor, self._row_moving = tensor_processor(arch, header.metadata, name)
            try:
                self._mapping = hf_weights_map(skeleton, self._processor)
            except NotImplementedError:
                raise UnsupportedModel(
                    f"{name}: no GGUF name map for model type '{getattr(skeleton.config, 'model_type', '?')}'"
                ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._file = fd, name
        self._tensors: dict[str, GGUFTensorHeader] = {}
        self._infos: dict[str, TensorInfo] = {}
        for t in header.tensors:  # later tensors win, as in transformers' loader
            hf_name = self._mapping.get(t.name)
            if hf_name is not None:
                self._tensors[hf_name] = t
                self._infos[hf_name] = TensorInfo(hf_name, t.shape, t.qtype.name, t.nbytes, name)

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def gguf_name(self, name: str) -> str:
        """The GGUF tensor name behind an HF parameter name."""
        self._info(name)
        return self._tensors[name].name

    def _load(self, info: TensorInfo, rows: tuple[int, int] | None) -> torch.Tensor:
        name = info.name
        if rows is None:
            return self._dequantized(name, 0, info.shape[0])
        gguf_name = self._tensors[name].name
        if any(part in gguf_name for part in self._row_moving):
            raise ValueError(
                f"{name} cannot be read by rows: transformers reorders its rows ({gguf_name}); read the whole tensor"
            )
        return self._dequantized(name, *rows)

    def _dequantized(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0, dequantized and processed, float32 (or the plain type)."""
        t = self._tensors[name]
        if self._fd is None:
            raise ValueError("the weight reader is closed")
        shape = (stop - start, *t.shape[1:])
        if math.prod(shape) == 0:
            return torch.zeros(shape, dtype=torch.float32)
        # rows of block types are byte-contiguous (a row holds whole blocks; checked at open)
        row_bytes = t.nbytes // t.shape[0]
        whole = (start, stop) == (0, t.shape[0])
        first, count = (0, t.nbytes) if whole else (start * row_bytes, (stop - start) * row_bytes)
        raw = pread_exact(self._fd, count, t.offset + first, file=self._file, tensor=name)
        if t.qtype in _PLAIN:
            weights = raw.view(_PLAIN[t.qtype]).reshape(shape)
        else:  # the arrays gguf.GGUFReader would hand transformers: typed floats or byte rows
            data: np.ndarray[Any, Any]
            if t.qtype == GGMLQuantizationType.F32:
                data = raw.view(np.float32).reshape(shape)
            elif t.qtype == GGMLQuantizationType.F16:
                data = raw.view(np.float16).reshape(shape)
            else:
                data = raw.reshape(quant_shape_to_byte_shape(shape, t.qtype))
            try:
                weights = dequantize(data, t.qtype)
            except NotImplementedError:
                raise UnsupportedModel(
                    f"tensor {name} in {self._file} has type {t.qtype.name}, which gguf-py cannot dequantize",
                    details={"file": self._file, "tensor": name},
                ) from None
            del data, raw
        result = self._processor.process(
            weights=weights, name=t.name, tensor_key_mapping=self._mapping, parsed_parameters={"tensors": {}}
        )
        out = torch.from_numpy(np.ascontiguousarray(result.weights))
        if tuple(out.shape) != shape:  # a processor that reshapes would break the row contract
            raise UnsupportedModel(
                f"tensor {name}: transformers' processing changes its shape {shape} -> {tuple(out.shape)}",
                details={"tensor": name},
            )
        return out

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)
