"""Safetensors checkpoints read tensor by tensor with positioned reads.

Headers are validated the way the safetensors library itself does (it refuses the same files, so
`from_pretrained` would fail on them too): an 8-byte little-endian header length of at most
100 MB, a JSON object header, known dtypes, shape x itemsize equal to the data length, and data
offsets that tile the data section exactly — no overlap, no gap, nothing past the end.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import ModelInvalid
from core.weights import (
    CheckpointSummary,
    TensorInfo,
    WeightReader,
    check_file_name,
    open_model_file,
    pread_exact,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_INDEX_BYTES = 100_000_000

# safetensors dtype name -> torch dtype (byte order: safetensors is little-endian, like our hosts)
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    offset: int  # absolute byte offset of the tensor's data in its file


def _invalid(message: str, *, file: str, tensor: str | None = None) -> ModelInvalid:
    details = {"file": file} if tensor is None else {"file": file, "tensor": tensor}
    return ModelInvalid(message, details=details)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_header(fd: int, size: int, file: str) -> tuple[dict[str, _Entry], int]:
    """Validated tensors of one safetensors file and its header size (8 + header length)."""
    if size < 8:
        raise _invalid(f"{file} is too short to be a safetensors file ({size} bytes)", file=file)
    header_len = int.from_bytes(pread_exact(fd, 8, 0, file=file, tensor="<header>").tobytes(), "little")
    if header_len > MAX_HEADER_BYTES:
        raise _invalid(
            f"{file} claims a {header_len}-byte header, over the {MAX_HEADER_BYTES}-byte limit "
            "(corrupt or not a safetensors file)",
            file=file,
        )
    if 8 + header_len > size:
        raise _invalid(
            f"{file} claims a {header_len}-byte header but has only {size} bytes (truncated or not a safetensors file)",
            file=file,
        )
    raw = pread_exact(fd, header_len, 8, file=file, tensor="<header>").tobytes()
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _invalid(f"the header of {file} is not valid JSON ({exc})", file=file) from None
    if not isinstance(header, dict):
        raise _invalid(f"the header of {file} is not a JSON object", file=file)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(f"the __metadata__ of {file} is not a string-to-string object", file=file)

    data_start, data_len = 8 + header_len, size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    entries: dict[str, _Entry] = {}
    for name, spec in header.items():
        dtype, shape, begin, end = _entry_fields(name, spec, file)
        need = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != need:
            raise _invalid(
                f"tensor {name} in {file}: shape {tuple(shape)} of {dtype} needs {need} bytes, "
                f"its data_offsets span {end - begin}",
                file=file,
                tensor=name,
            )
        spans.append((begin, end, name))
        entries[name] = _Entry(TensorInfo(name, tuple(shape), dtype, need, file), data_start + begin)

    spans.sort()
    for _begin, end, name in spans:
        if end > data_len:
            raise _invalid(f"tensor {name} lies past the end of {file} (truncated?)", file=file, tensor=name)
    cursor, previous = 0, None
    for begin, end, name in spans:
        if begin < cursor:
            raise _invalid(f"tensor {name} overlaps tensor {previous} in {file}", file=file, tensor=name)
        if begin > cursor:
            raise _invalid(
                f"{file} has {begin - cursor} unused bytes before tensor {name} "
                "(data offsets must tile the data section)",
                file=file,
                tensor=name,
            )
        cursor, previous = end, name
    if cursor != data_len:
        raise _invalid(f"{file} has {data_len - cursor} bytes after its last tensor (corrupt?)", file=file)
    return entries, data_start


def _entry_fields(name: str, spec: object, file: str) -> tuple[str, list[int], int, int]:
    def bad(why: str) -> ModelInvalid:
        return _invalid(f"tensor {name} in {file}: {why}", file=file, tensor=name)

    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise bad("entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    return dtype, shape, offsets[0], offsets[1]


def _read_index(directory: Path, root: Path) -> dict[str, str]:
    """weight_map of model.safetensors.index.json, every shard name checked."""
    fd, size = open_model_file(directory, INDEX_FILE, root, "index")
    try:
        if size > MAX_INDEX_BYTES:
            raise _invalid(f"{INDEX_FILE} is {size} bytes, over the {MAX_INDEX_BYTES}-byte limit", file=INDEX_FILE)
        raw = pread_exact(fd, size, 0, file=INDEX_FILE, tensor="<index>").tobytes()
    finally:
        os.close(fd)
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _invalid(f"{INDEX_FILE} is not valid JSON ({exc})", file=INDEX_FILE) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise _invalid(f"{INDEX_FILE} has no weight_map object of tensor name -> shard file", file=INDEX_FILE)
    for shard in set(weight_map.values()):
        check_file_name(shard, INDEX_FILE)
    return weight_map


def _checkpoint_files(directory: Path, name: str | None, root: Path) -> tuple[list[str], dict[str, str] | None]:
    """(files to read, index weight_map or None)."""
    if name is not None:
        return [name], None
    if not directory.is_dir():
        raise ModelInvalid(f"model directory '{directory.name}' does not exist")
    if (directory / INDEX_FILE).exists() or (directory / INDEX_FILE).is_symlink():
        weight_map = _read_index(directory, root)
        return sorted(set(weight_map.values())), weight_map
    if (directory / SINGLE_FILE).exists() or (directory / SINGLE_FILE).is_symlink():
        return [SINGLE_FILE], None
    files = sorted(p.name for p in directory.iterdir() if p.name.endswith(".safetensors"))
    if not files:
        raise ModelInvalid("the model directory has no *.safetensors weights")
    return files, None


def _scan(
    directory: Path, name: str | None, root: Path, keep_open: bool
) -> tuple[dict[str, _Entry], dict[str, int], dict[str, int]]:
    """Validate every file of the checkpoint: (entries by tensor, fd by file, header bytes by file).
    Descriptors are closed on failure, and always unless `keep_open`."""
    files, weight_map = _checkpoint_files(directory, name, root)
    fds: dict[str, int] = {}
    headers: dict[str, int] = {}
    entries: dict[str, _Entry] = {}
    try:
        for file in files:
            role = "shard" if weight_map is not None else "file"
            fd, size = open_model_file(directory, file, root, role)
            fds[file] = fd
            found, headers[file] = parse_header(fd, size, file)
            for tensor, entry in found.items():
                if tensor in entries:
                    raise _invalid(
                        f"tensor {tensor} is defined in both {entries[tensor].info.file} and {file}",
                        file=file,
                        tensor=tensor,
                    )
                entries[tensor] = entry
        for tensor, shard in (weight_map or {}).items():
            mapped = entries.get(tensor)
            if mapped is None or mapped.info.file != shard:
                raise _invalid(
                    f"{INDEX_FILE} maps tensor {tensor} to shard {shard}, whose header does not contain it",
                    file=shard,
                    tensor=tensor,
                )
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    if not keep_open:
        for fd in fds.values():
            os.close(fd)
        fds = {}
    return entries, fds, headers


def summarize_safetensors(directory: Path, name: str | None, root: Path) -> CheckpointSummary:
    entries, _, headers = _scan(directory, name, root, keep_open=False)
    dtypes: dict[str, int] = {}
    for entry in entries.values():
        dtypes[entry.info.dtype] = dtypes.get(entry.info.dtype, 0) + 1
    return CheckpointSummary(
        files=len(headers),
        tensors=len(entries),
        total_bytes=sum(e.info.nbytes for e in entries.values()),
        dtypes=dtypes,
    )


class SafetensorsReader(WeightReader):
    """Every file's header parsed once; one descriptor per file, kept until close()."""

    def __init__(self, directory: Path, name: str | None, root: Path) -> None:
        self._fds: dict[str, int] = {}
        self._entries, self._fds, _ = _scan(directory, name, root, keep_open=True)
        self._infos = {name: entry.info for name, entry in self._entries.items()}

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def _raw(self, name: str, first: int, count: int) -> torch.Tensor:
        """Elements [first, first + count) of the flattened tensor, in its stored dtype."""
        entry = self._entries.get(name)
        if entry is None:
            raise KeyError(f"no tensor {name!r} in this checkpoint")
        fd = self._fds.get(entry.info.file)
        if fd is None:
            raise ValueError("the weight reader is closed")
        dtype = DTYPES[entry.info.dtype]
        if count == 0:  # a zero-length uint8 tensor cannot be viewed as another dtype
            return torch.empty(0, dtype=dtype)
        size = dtype.itemsize
        buf = pread_exact(fd, count * size, entry.offset + first * size, file=entry.info.file, tensor=name)
        return torch.from_numpy(buf).view(dtype)

    def _load(self, info: TensorInfo, rows: tuple[int, int] | None) -> torch.Tensor:
        if rows is None:
            return self._raw(info.name, 0, math.prod(info.shape)).reshape(info.shape)
        start, stop = rows
        cols = info.shape[1]
        return self._raw(info.name, start * cols, (stop - start) * cols).reshape(stop - start, cols)

    def close(self) -> None:
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            os.close(fd)
