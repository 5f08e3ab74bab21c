"""Typed results passed between the core layers (rule 4: dataclasses, not tuples or dicts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Protocol

import torch

#: progress(stage, fraction_of_stage_done in [0, 1], human message)
ProgressFn = Callable[[str, float, str], None]
#: returns True when the job was asked to stop; checked at least once per layer
CancelFn = Callable[[], bool]


def no_progress(stage: str, fraction: float, message: str) -> None:
    return None


def never_cancel() -> bool:
    return False


def effective_bits(bits: int, group_size: int, symmetric: bool) -> float:
    """Stored bits per weight: codes plus an fp16 scale (and an fp16-counted zero) per group.

    16 means "kept in fp16/bf16": no codes, no group overhead.
    """
    if bits >= 16:
        return 16.0
    overhead = 16 if symmetric else 32
    return bits + overhead / group_size


@dataclass(frozen=True)
class QuantizedWeight:
    """Group-wise integer weight of one linear: w ≈ scale * (code - zero), groups along `in`.

    `codes` are unsigned, shape [out, n_groups * group_size]; columns past `shape[1]` are padding
    (code == zero, so they dequantize to 0 and never reach the output). `scale` is float16
    [out, n_groups]. `zero` is uint8 [out, n_groups] for asymmetric; for symmetric it is None and
    the zero point is the constant 2**(bits-1).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool
    shape: tuple[int, int]

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    @property
    def effective_bits(self) -> float:
        return effective_bits(self.bits, self.group_size, self.symmetric)

    def zero_points(self) -> torch.Tensor:
        if self.zero is not None:
            return self.zero
        return torch.full_like(self.scale, 2 ** (self.bits - 1), dtype=torch.uint8)


class LayerRefLike(Protocol):
    index: int
    name: str


@dataclass(frozen=True)
class LayerProfile:
    """One transformer layer in the sensitivity profile.

    `scores` holds every raw score the method computed (e.g. `information`, `stability`, `kl`,
    `delta_em`); `quant_error[bits]` is the measured relative output error of the layer's linears
    at that width on calibration activations; `sensitivity` (>= 0) is what the budget allocator
    weighs that error with; `importance` is the method's ranking score (z-scored for TAQ).
    """

    index: int
    name: str
    params: int
    scores: dict[str, float]
    importance: float
    sensitivity: float
    quant_error: dict[int, float] = field(default_factory=dict)
    bits: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["quant_error"] = {str(k): v for k, v in self.quant_error.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerProfile":
        data = dict(data)
        data["quant_error"] = {int(k): float(v) for k, v in data.get("quant_error", {}).items()}
        return cls(**data)


@dataclass(frozen=True)
class Profile:
    model: str
    method: str
    layers: list[LayerProfile]

    def with_bits(self, bits_by_layer: dict[str, int]) -> "Profile":
        return replace(self, layers=[replace(l, bits=bits_by_layer.get(l.name)) for l in self.layers])

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "layers": [l.to_dict() for l in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profile":
        return cls(model=data["model"], method=data["method"],
                   layers=[LayerProfile.from_dict(l) for l in data["layers"]])


@dataclass(frozen=True)
class BitAllocation:
    """Bits per layer (layer name -> bits) and what they cost."""

    bits: dict[str, int]
    effective_bits: float
    budget: float | None
    rule: str  # "budget" | "paper" | "uniform"
    objective: float | None = None
    solver: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
