"""Per-layer checkpoints of the layer pass, in whatever store the caller gives (object storage in
the worker, memory in tests and the bench).

For layer i the pass writes, under `prefix`:
- `layers/{i:05d}/b{bits}.safetensors` per stored width: every linear's codes (the dense uint8
  bitstream of `core.quant.packing.pack_codes`), fp16 scales and, for asymmetric grids, uint8 zero
  points; the grid (bits, group size, symmetry, shape) in the header metadata;
- `layers/{i:05d}.json` last, as the commit marker: the linears' weight counts and measured errors
  per width, the scorer's per-layer values, and `pass_key` (a digest of every setting that shaped
  the pass), so a record of another pass is never mistaken for this one's.

A layer with a record is complete; everything after the first missing record is recomputed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from core.types import QuantizedWeight

__all__ = ["CheckpointStore", "LayerRecord", "MemoryStore", "load_codes", "load_record", "save_layer"]


class CheckpointStore(Protocol):
    """Bytes by key (keys are relative, '/'-separated). `put_bytes` must be atomic."""

    def exists(self, key: str) -> bool: ...

    def get_bytes(self, key: str) -> bytes: ...

    def put_bytes(self, key: str, data: bytes) -> Any: ...


class MemoryStore:
    """A CheckpointStore in a dict (tests, the bench)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def exists(self, key: str) -> bool:
        return key in self.objects

    def get_bytes(self, key: str) -> bytes:
        return self.objects[key]

    def put_bytes(self, key: str, data: bytes) -> None:
        self.objects[key] = bytes(data)

    def put_file(self, key: str, path: str | os.PathLike[str], *, handover: bool = False) -> None:
        with open(path, "rb") as fh:
            self.objects[key] = fh.read()

    def delete_prefix(self, prefix: str) -> int:
        keys = [k for k in self.objects if k.startswith(prefix)]
        for key in keys:
            del self.objects[key]
        return len(keys)


@dataclass(frozen=True)
class LayerRecord:
    index: int
    name: str
    pass_key: str
    params: dict[str, int]  # linear -> weight count
    errors: dict[str, dict[int, float]]  # linear -> width -> relative output error
    widths: list[int]  # widths whose codes are stored
    scorer: dict[str, float] = field(default_factory=dict)
    in_features: dict[str, int] = field(default_factory=dict)  # linear -> input width

    def to_json(self) -> bytes:
        # not sort_keys: the linears keep the module order, which the profile (and the order its
        # errors are summed in) follows; insertion order is deterministic
        data = {
            "index": self.index,
            "name": self.name,
            "pass_key": self.pass_key,
            "params": self.params,
            "errors": {n: {str(b): e for b, e in errs.items()} for n, errs in self.errors.items()},
            "widths": self.widths,
            "scorer": dict(sorted(self.scorer.items())),
            "in_features": self.in_features,
        }
        return json.dumps(data).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> LayerRecord:
        data = json.loads(raw)
        return cls(
            index=int(data["index"]),
            name=data["name"],
            pass_key=data["pass_key"],
            params={k: int(v) for k, v in data["params"].items()},
            errors={n: {int(b): float(e) for b, e in errs.items()} for n, errs in data["errors"].items()},
            widths=[int(b) for b in data["widths"]],
            scorer={k: float(v) for k, v in data["scorer"].items()},
            in_features={k: int(v) for k, v in data.get("in_features", {}).items()},
        )


def _layer_dir(prefix: str, index: int) -> str:
    return f"{prefix.rstrip('/')}/layers/{index:05d}" if prefix else f"layers/{index:05d}"


def record_key(prefix: str, index: int) -> str:
    return _layer_dir(prefix, index) + ".json"


def codes_key(prefix: str, index: int, bits: int) -> str:
    return f"{_layer_dir(prefix, index)}/b{bits}.safetensors"


#: codes are packed and unpacked this many rows at a time (packing widens them to int64)
_ROW_CHUNK = 512


def _rowwise(fn: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(tensor[i : i + _ROW_CHUNK]) for i in range(0, tensor.shape[0], _ROW_CHUNK)])


def _encode(weights: dict[str, QuantizedWeight]) -> bytes:
    from safetensors.torch import save

    from core.quant.packing import pack_codes

    tensors: dict[str, torch.Tensor] = {}
    grids: dict[str, Any] = {}
    for name, q in sorted(weights.items()):

        def pack(rows: torch.Tensor, b: int = q.bits) -> torch.Tensor:
            return pack_codes(rows.cpu().contiguous(), b)

        tensors[f"{name}.codes"] = _rowwise(pack, q.codes)
        # float16, or float32 on K-quant super-blocks (d · sc is exact only there)
        dtype = torch.float32 if q.scale.dtype == torch.float32 else torch.float16
        tensors[f"{name}.scale"] = q.scale.cpu().to(dtype).contiguous()
        if q.zero is not None:
            tensors[f"{name}.zero"] = q.zero.cpu().contiguous()
        if q.offset is not None:
            tensors[f"{name}.offset"] = q.offset.cpu().to(dtype).contiguous()
        grids[name] = {
            "bits": q.bits,
            "group_size": q.group_size,
            "symmetric": q.symmetric,
            "shape": list(q.shape),
            "columns": int(q.codes.shape[1]),
        }
    return save(tensors, metadata={"grids": json.dumps(grids, sort_keys=True)})


def _decode(raw: bytes, device: torch.device | str = "cpu") -> dict[str, QuantizedWeight]:
    from safetensors.torch import load

    from core.quant.packing import unpack_codes

    tensors = load(raw)
    header_len = int.from_bytes(raw[:8], "little")
    grids = json.loads(json.loads(raw[8 : 8 + header_len])["__metadata__"]["grids"])
    out: dict[str, QuantizedWeight] = {}
    for name, grid in grids.items():

        def unpack(rows: torch.Tensor, g: dict[str, Any] = grid) -> torch.Tensor:
            return unpack_codes(rows, g["bits"], g["columns"])

        codes = _rowwise(unpack, tensors[f"{name}.codes"])
        out[name] = QuantizedWeight(
            codes=codes.to(device),
            scale=tensors[f"{name}.scale"].to(device),
            zero=tensors[f"{name}.zero"].to(device) if f"{name}.zero" in tensors else None,
            bits=int(grid["bits"]),
            group_size=int(grid["group_size"]),
            symmetric=bool(grid["symmetric"]),
            shape=tuple(grid["shape"]),
            offset=tensors[f"{name}.offset"].to(device) if f"{name}.offset" in tensors else None,
        )
    return out


def save_layer(
    store: CheckpointStore, prefix: str, record: LayerRecord, codes: dict[int, dict[str, QuantizedWeight]]
) -> None:
    """Codes first, the record last: a record's presence means the layer is complete."""
    for bits in record.widths:
        store.put_bytes(codes_key(prefix, record.index, bits), _encode(codes[bits]))
    store.put_bytes(record_key(prefix, record.index), record.to_json())


def load_record(store: CheckpointStore, prefix: str, index: int, pass_key: str) -> LayerRecord | None:
    key = record_key(prefix, index)
    if not store.exists(key):
        return None
    record = LayerRecord.from_json(store.get_bytes(key))
    return record if record.pass_key == pass_key else None


def load_codes(
    store: CheckpointStore, prefix: str, index: int, bits: int, device: torch.device | str = "cpu"
) -> dict[str, QuantizedWeight]:
    return _decode(store.get_bytes(codes_key(prefix, index, bits)), device)
