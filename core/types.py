"""Typed results passed between the core layers (rule 4: dataclasses, not tuples or dicts)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import torch

from core.errors import InvalidSpec
from core.scheme import effective_bits
from core.spec import ALLOWED_BITS, AllocationRule, AllocationUnit, Method

#: progress(stage, fraction_of_stage_done in [0, 1], human message)
ProgressFn = Callable[[str, float, str], None]
#: returns True when the job was asked to stop; checked at least once per layer
CancelFn = Callable[[], bool]


def no_progress(stage: str, fraction: float, message: str) -> None:
    return None


def never_cancel() -> bool:
    return False


#: the width that means "not quantized": the weight kept in fp16/bf16
KEEP_BITS = 16
#: the widths a weight can be quantized to (the spec's menu without KEEP_BITS)
QUANTIZED_BITS = tuple(b for b in ALLOWED_BITS if b != KEEP_BITS)
#: version of profile.json and bitmap.json; readers accept this one and older
JSON_VERSION = 1


@dataclass(frozen=True)
class QuantizedWeight:
    """Group-wise integer weight of one linear: w ≈ scale * (code - zero), groups along `in`, or
    w ≈ scale * code + offset with a float zero point.

    `codes` are unsigned, shape [out, n_groups * group_size]; columns past `shape[1]` are padding
    (dropped by every reader). `scale` is float16 [out, n_groups] (float32, with `offset`, on GGUF
    K-quant super-blocks: d · sc exactly, core/quant/superblocks.py). `zero` is uint8
    [out, n_groups] for asymmetric; for symmetric it is None and the zero point is the constant
    2**(bits-1). `offset` (float16 [out, n_groups], asymmetric only, `zero` then None) is a float
    zero point: the value of code 0, as GGUF's Q4_1/Q5_1 blocks store it.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool
    shape: tuple[int, int]
    offset: torch.Tensor | None = None

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    @property
    def float_zero(self) -> bool:
        return self.offset is not None

    @property
    def effective_bits(self) -> float:
        return effective_bits(self.bits, self.group_size, self.symmetric, self.shape[1], self.float_zero)

    def zero_points(self) -> torch.Tensor:
        """The integer zero point of every group (a weight with a float zero point has none)."""
        if self.offset is not None:
            raise ValueError("a weight with a float zero point (offset) has no integer zero point")
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
    #: the weight's input width (None in profiles written before it was kept): with `params` it
    #: gives the shape, so the allocator counts the padded last group of every row
    in_features: int | None = None
    #: predicted task-loss increase per width below 16 (methods that predict it, e.g. taq_grad)
    predicted_loss: dict[int, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int] | None:
        if not self.in_features:
            return None
        return self.params // self.in_features, self.in_features

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params,
            "quant_error": {str(k): v for k, v in self.quant_error.items()},
            "bits": self.bits,
            "in_features": self.in_features,
            **_predicted_json(self.predicted_loss),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearProfile:
        return cls(
            name=data["name"],
            params=int(data["params"]),
            quant_error={int(k): float(v) for k, v in data.get("quant_error", {}).items()},
            bits=data.get("bits"),
            in_features=data.get("in_features"),
            predicted_loss=_predicted_from_json(data),
        )


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
    #: predicted task-loss increase per width below 16 (Σ of the linears'; empty for methods that
    #: weigh a measured error instead): when present the allocator minimises it directly
    predicted_loss: dict[int, float] = field(default_factory=dict)

    @property
    def mean_bits(self) -> float | None:
        """Parameter-weighted mean nominal bits of the layer's linears (the layer's bits when
        they share one width); None before allocation."""
        if self.bits is not None:
            return float(self.bits)
        if not self.linears or any(l.bits is None for l in self.linears):
            return None
        return sum(cast(int, l.bits) * l.params for l in self.linears) / sum(l.params for l in self.linears)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["quant_error"] = {str(k): v for k, v in self.quant_error.items()}
        data["linears"] = [l.to_dict() for l in self.linears]
        del data["predicted_loss"]
        data.update(_predicted_json(self.predicted_loss))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerProfile:
        data = dict(data)
        data["quant_error"] = {int(k): float(v) for k, v in data.get("quant_error", {}).items()}
        data["linears"] = [LinearProfile.from_dict(l) for l in data.get("linears", [])]
        data["predicted_loss"] = _predicted_from_json(data)
        return cls(**data)


def _predicted_json(predicted: Mapping[int, float]) -> dict[str, Any]:
    """`predicted_loss` in JSON, only when the method predicts it (other profiles keep their bytes)."""
    return {"predicted_loss": {str(k): v for k, v in predicted.items()}} if predicted else {}


def _predicted_from_json(data: Mapping[str, Any]) -> dict[int, float]:
    return {int(k): float(v) for k, v in data.get("predicted_loss", {}).items()}


@dataclass(frozen=True)
class Profile:
    model: str
    method: str
    layers: list[LayerProfile]

    def with_bits(self, bit_map: BitMap) -> Profile:
        """The profile with an allocation's bits (per layer or per linear): every linear gets its
        bits, a layer its width when its linears share one."""
        layers = []
        for layer in self.layers:
            linears = [replace(l, bits=bit_map.get(l.name, layer.name)) for l in layer.linears]
            widths = {l.bits for l in linears}
            single = widths.pop() if len(widths) == 1 else None
            layer_bits = bit_map.bits.get(layer.name, single) if bit_map.unit == AllocationUnit.layer else single
            layers.append(replace(layer, bits=layer_bits, linears=linears))
        return replace(self, layers=layers)

    def without_bits(self) -> Profile:
        """The profile before allocation: no layer or linear has bits."""
        layers = [
            replace(layer, bits=None, linears=[replace(l, bits=None) for l in layer.linears]) for layer in self.layers
        ]
        return replace(self, layers=layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "model": self.model,
            "method": self.method,
            "layers": [l.to_dict() for l in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        check_version(data, "profile")
        return cls(
            model=data["model"], method=data["method"], layers=[LayerProfile.from_dict(l) for l in data["layers"]]
        )


def check_version(data: Mapping[str, Any], what: str) -> None:
    """Refuse a profile / bit map JSON written by a newer version (no `version`: the first one)."""
    version = data.get("version", JSON_VERSION)
    if not isinstance(version, int) or version > JSON_VERSION:
        raise InvalidSpec(f"{what} version {version!r} is newer than this service reads ({JSON_VERSION})")


@dataclass(frozen=True)
class BitMap:
    """Bits per allocation unit, the one place a linear's width is looked up: `bits` maps full
    dotted names of decoder layers (`unit` layer) or of decoder linears (`unit` linear) to widths."""

    bits: Mapping[str, int]
    unit: AllocationUnit = AllocationUnit.layer

    @property
    def manifest_key(self) -> str:
        """The bit map's name in manifest.json: `bits_by_layer` or `bits_by_linear`."""
        return "bits_by_linear" if self.unit == AllocationUnit.linear else "bits_by_layer"

    def get(self, linear_name: str, layer_name: str) -> int | None:
        """The width of one linear (its own entry per linear, else its layer's); None if absent."""
        width = self.bits.get(linear_name if self.unit == AllocationUnit.linear else layer_name)
        return None if width is None else int(width)

    def linear_bits(self, layers: Iterable[Any]) -> dict[str, int]:
        """The width of every decoder linear (full dotted name); `layers` are LayerRefs (anything
        with `.name` and `.linears`). InvalidSpec naming the units the map misses."""
        out: dict[str, int] = {}
        missing: list[str] = []
        for ref in layers:
            for name in ref.linears:
                width = self.get(name, ref.name)
                if width is None:
                    missing.append(name if self.unit == AllocationUnit.linear else ref.name)
                else:
                    out[name] = width
        if missing:
            missing = list(dict.fromkeys(missing))
            raise InvalidSpec(f"the allocation has no bits for {missing[:3]}{' …' if len(missing) > 3 else ''}")
        return out


def _rule(value: AllocationRule | Method | str) -> AllocationRule | Method:
    """An allocation's rule: the spec's AllocationRule, or `uniform` (method uniform and the
    equal-bits uniform control)."""
    if isinstance(value, AllocationRule | Method):
        return value
    if value == Method.uniform.value:
        return Method.uniform
    return AllocationRule(value)


@dataclass(frozen=True)
class BitAllocation:
    """Bits per allocation unit and what they cost: `bits` maps full dotted names of layers
    (`unit` layer) or of linears (`unit` linear) to bits; `rule` says what chose them (strings
    are accepted and turned into the enums, e.g. from bitmap.json)."""

    bits: dict[str, int]
    effective_bits: float
    budget: float | None
    rule: AllocationRule | Method
    objective: float | None = None
    solver: str = ""
    unit: AllocationUnit = AllocationUnit.layer
    #: with `closed_loop: true`: the candidates measured on held-back rows and which was shipped
    #: (`core.closed_loop`); None otherwise
    closed_loop: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", _rule(self.rule))
        object.__setattr__(self, "unit", AllocationUnit(self.unit))

    @property
    def bit_map(self) -> BitMap:
        return BitMap(self.bits, self.unit)

    def to_dict(self) -> dict[str, Any]:
        data = {**asdict(self), "rule": self.rule.value, "unit": self.unit.value}
        if self.closed_loop is None:
            del data["closed_loop"]  # bitmap.json of other jobs keeps its bytes
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BitAllocation:
        return cls(**data)
