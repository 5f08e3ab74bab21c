"""What a quantized weight costs to store: the grid a job quantizes on (`QuantScheme`) and the exact
stored bits of every width on it.

A width b below 16 stores b-bit codes in groups of `group_size` weights along the input dim, each
group with an fp16 scale and, unless symmetric, a zero point: an int8 one, or (`float_zero`, widths up
to `FLOAT_ZERO_MAX_BITS`) an fp16 offset. 16 bits is the weight kept in fp16/bf16, no overhead. The
allocators, the controls, the paper rule, the closed loop and the reports all price widths through
one `QuantScheme`, so they cannot disagree on a cost.
"""

from __future__ import annotations

from dataclasses import dataclass

#: bits of one group's scale: float16
SCALE_BITS = 16
#: bits of one group's stored zero point (asymmetric weights): our hf export keeps it as int8 (the
#: compressed-tensors `block` layout transformers loads; the vLLM `group` layout packs it tighter)
ZERO_POINT_BITS = 8
#: bits of a float zero point: an fp16 offset m per group (w = scale · code + m, GGUF's Q4_1/Q5_1)
FLOAT_ZERO_BITS = 16
#: the widest width stored with a float zero point under `zero_point: "float"`: GGML's offset
#: blocks are 4 and 5 bits; 6-8 bits (Q8_0) keep the integer zero point
FLOAT_ZERO_MAX_BITS = 5


def float_zero_at(bits: int, symmetric: bool, float_zero: bool) -> bool:
    """Whether a weight at `bits` is stored with a float zero point (an fp16 offset) under the
    job's grid: asymmetric, `zero_point: "float"` and at most `FLOAT_ZERO_MAX_BITS` bits."""
    return float_zero and not symmetric and bits <= FLOAT_ZERO_MAX_BITS


def group_overhead_bits(bits: int, symmetric: bool, float_zero: bool = False) -> int:
    """Stored bits per group besides the codes: the scale, and the zero point when asymmetric
    (an int8 one, or an fp16 offset where `float_zero_at`)."""
    if symmetric:
        return SCALE_BITS
    return SCALE_BITS + (FLOAT_ZERO_BITS if float_zero_at(bits, symmetric, float_zero) else ZERO_POINT_BITS)


def stored_bits(bits: int, group_size: int, symmetric: bool, shape: tuple[int, int], float_zero: bool = False) -> int:
    """Exact stored bits of one [out, in] weight: codes for the real columns plus a scale (and a
    zero point) for every group, the last partial group of a row included (576 inputs in groups
    of 128 store 5 groups). 16 bits: the weight kept in fp16/bf16, no group overhead."""
    out_features, in_features = shape
    if bits >= 16:
        return 16 * out_features * in_features
    groups = -(-in_features // group_size)
    return out_features * (in_features * bits + groups * group_overhead_bits(bits, symmetric, float_zero))


def effective_bits(
    bits: int, group_size: int, symmetric: bool, in_features: int | None = None, float_zero: bool = False
) -> float:
    """Stored bits per weight (`stored_bits` / weights). Without `in_features` the row is taken as
    whole groups (no padded partial group). 16 means "kept in fp16/bf16": no group overhead."""
    if bits >= 16:
        return 16.0
    if in_features is None:
        return bits + group_overhead_bits(bits, symmetric, float_zero) / group_size
    return stored_bits(bits, group_size, symmetric, (1, in_features), float_zero) / in_features


@dataclass(frozen=True)
class QuantScheme:
    """The grid every quantized width of a job is stored on (see the module docstring)."""

    group_size: int
    symmetric: bool = False
    float_zero: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if self.float_zero and self.symmetric:
            raise ValueError("float zero points are for asymmetric grids; a symmetric grid has no zero point")

    def overhead_bits(self, bits: int) -> int:
        """Stored bits per group besides the codes at `bits` (see `group_overhead_bits`)."""
        return group_overhead_bits(bits, self.symmetric, self.float_zero)

    def stored_bits(self, bits: int, shape: tuple[int, int]) -> int:
        """Exact stored bits of one [out, in] weight at `bits` (see `stored_bits`)."""
        return stored_bits(bits, self.group_size, self.symmetric, shape, self.float_zero)

    def effective_bits(self, bits: int, in_features: int | None = None) -> float:
        """Stored bits per weight at `bits` (see `effective_bits`)."""
        return effective_bits(bits, self.group_size, self.symmetric, in_features, self.float_zero)

    def describe(self) -> str:
        """The grid in words, as messages show it (e.g. "group_size 128, asymmetric")."""
        kind = "symmetric" if self.symmetric else "asymmetric, float zero points" if self.float_zero else "asymmetric"
        return f"group_size {self.group_size}, {kind}"
