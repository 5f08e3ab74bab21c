"""Typed results passed between the core layers (rule 4: dataclasses, not tuples or dicts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

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


@dataclass(frozen=True)
class LinearProfile:
    """One linear of a layer: its own relative output error per width (the layer's `quant_error`
    is the parameter-weighted mean of these) and, under per-linear allocation, its bits."""

    name: str
    params: int
    quant_error: dict[int, float] = field(default_factory=dict)
    bits: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params,
                "quant_error": {str(k): v for k, v in self.quant_error.items()}, "bits": self.bits}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LinearProfile":
        return cls(name=data["name"], params=int(data["params"]),
                   quant_error={int(k): float(v) for k, v in data.get("quant_error", {}).items()},
                   bits=data.get("bits"))


@dataclass(frozen=True)
class LayerProfile:
    """One transformer layer in the sensitivity profile.

    `scores` holds every raw score the method computed (e.g. `information`, `stability`, `kl`,
    `delta_em`); `quant_error[bits]` is the measured relative output error of the layer's linears
    at that width on calibration activations; `sensitivity` (>= 0) is what the budget allocator
    weighs that error with; `importance` is the method's ranking score (z-scored for TAQ).
    `linears` holds each linear's own errors (empty in profiles written before they were kept).
    `bits` is the layer's width when all its linears share one; under per-linear allocation with
    mixed widths it is None and `mean_bits` gives the parameter-weighted mean.
    """

    index: int
    name: str
    params: int
    scores: dict[str, float]
    importance: float
    sensitivity: float
    quant_error: dict[int, float] = field(default_factory=dict)
    bits: int | None = None
    linears: list[LinearProfile] = field(default_factory=list)

    @property
    def mean_bits(self) -> float | None:
        """Parameter-weighted mean nominal bits of the layer's linears (the layer's bits when
        they share one width); None before allocation."""
        if self.bits is not None:
            return float(self.bits)
        if not self.linears or any(l.bits is None for l in self.linears):
            return None
        return sum(l.bits * l.params for l in self.linears) / sum(l.params for l in self.linears)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["quant_error"] = {str(k): v for k, v in self.quant_error.items()}
        data["linears"] = [l.to_dict() for l in self.linears]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerProfile":
        data = dict(data)
        data["quant_error"] = {int(k): float(v) for k, v in data.get("quant_error", {}).items()}
        data["linears"] = [LinearProfile.from_dict(l) for l in data.get("linears", [])]
        return cls(**data)


@dataclass(frozen=True)
class Profile:
    model: str
    method: str
    layers: list[LayerProfile]

    def with_bits(self, bits: dict[str, int]) -> "Profile":
        """The profile with an allocation's bits: `bits` is keyed by layer names (per-layer
        allocation) or by linear names (per-linear); every linear gets its bits either way."""
        layers = []
        for layer in self.layers:
            linears = [replace(l, bits=bits.get(l.name, bits.get(layer.name))) for l in layer.linears]
            widths = {l.bits for l in linears}
            if layer.name in bits:
                layer_bits = bits[layer.name]
            else:
                layer_bits = widths.pop() if len(widths) == 1 else None
            layers.append(replace(layer, bits=layer_bits, linears=linears))
        return replace(self, layers=layers)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "layers": [l.to_dict() for l in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profile":
        return cls(model=data["model"], method=data["method"],
                   layers=[LayerProfile.from_dict(l) for l in data["layers"]])


@dataclass(frozen=True)
class BitAllocation:
    """Bits per allocation unit and what they cost: `bits` maps full dotted names of layers
    (`unit` "layer") or of linears (`unit` "linear") to bits."""

    bits: dict[str, int]
    effective_bits: float
    budget: float | None
    rule: str  # "budget" | "paper" | "uniform"
    objective: float | None = None
    solver: str = ""
    unit: str = "layer"

    def bits_of(self, linear_name: str, layer_name: str) -> int:
        """The bits of one linear: its own entry under per-linear allocation, else its layer's."""
        return int(self.bits[linear_name] if self.unit == "linear" else self.bits[layer_name])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
