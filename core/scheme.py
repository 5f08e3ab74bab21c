"""What a quantized weight costs to store: the grid a job quantizes on (`QuantScheme`) and the exact
stored bits of every width on it.

A width b below 16 stores b-bit codes in groups of `group_size` weights along the input dim, each
group with an fp16 scale and, unless symmetric, a zero point: an int8 one, or (`float_zero`, widths up
to `FLOAT_ZERO_MAX_BITS`) an fp16 offset. 16 bits is the weight kept in fp16/bf16, no overhead. Under `k_quants`
(GGUF's Q4_K / Q5_K) the float-zero 4- and 5-bit widths of a weight whose input dim is a multiple of
256 are stored in super-blocks of 256: the eight groups' scales and offsets are 6-bit multiples of
one fp16 scale each, 128 bits a super-block (4.5 / 5.5 bits a weight); on a symmetric grid the
6-bit width likewise as Q6_K (int8 multiples of one fp16 scale, 144 bits: 6.5625 bits a weight). The
allocators, the controls, the paper rule, the closed loop and the reports all price widths through
one `QuantScheme`, so they cannot disagree on a cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
#: weights per K-quant super-block and the group size its sub-blocks need
SUPER_BLOCK = 256
SUPER_GROUP_SIZE = 32
#: the widths stored in K-quant super-blocks under `k_quants`: float-zero 4/5 bits (Q4_K, Q5_K)
#: and symmetric 6 bits (Q6_K)
SUPER_FLOAT_BITS = (4, 5)
SUPER_SYMMETRIC_BITS = (6,)
#: the bits a super-block stores besides its codes: Q4_K/Q5_K fp16 d and dmin and twelve bytes
#: of 6-bit sub-scales and sub-mins; Q6_K fp16 d and sixteen int8 sub-scales
SUPER_OVERHEAD_BITS = {4: 2 * 16 + 12 * 8, 5: 2 * 16 + 12 * 8, 6: 16 + 16 * 8}


def float_zero_at(bits: int, symmetric: bool, float_zero: bool) -> bool:
    """Whether a weight at `bits` is stored with a float zero point (an fp16 offset) under the
    job's grid: asymmetric, `zero_point: "float"` and at most `FLOAT_ZERO_MAX_BITS` bits."""
    return float_zero and not symmetric and bits <= FLOAT_ZERO_MAX_BITS


def superblocks_at(
    bits: int, group_size: int, symmetric: bool, float_zero: bool, k_quants: bool, in_features: int | None = None
) -> bool:
    """Whether a weight at `bits` is stored in K-quant super-blocks: `k_quants`, groups of 32, a
    float zero point at 4 or 5 bits or a symmetric grid at 6, and (when given) an input dim that
    is a multiple of 256."""
    kind = (bits in SUPER_FLOAT_BITS and float_zero_at(bits, symmetric, float_zero)) or (
        bits in SUPER_SYMMETRIC_BITS and symmetric
    )
    return (
        k_quants and kind and group_size == SUPER_GROUP_SIZE and (in_features is None or in_features % SUPER_BLOCK == 0)
    )


def group_overhead_bits(bits: int, symmetric: bool, float_zero: bool = False, superblocks: bool = False) -> int:
    """Stored bits per group besides the codes: the scale, and the zero point when asymmetric
    (an int8 one, or an fp16 offset where `float_zero_at`); in K-quant super-blocks a group's
    share of its super-block's overhead (16 bits)."""
    if superblocks:
        return SUPER_OVERHEAD_BITS[bits] * SUPER_GROUP_SIZE // SUPER_BLOCK
    if symmetric:
        return SCALE_BITS
    return SCALE_BITS + (FLOAT_ZERO_BITS if float_zero_at(bits, symmetric, float_zero) else ZERO_POINT_BITS)


def stored_bits(
    bits: int,
    group_size: int,
    symmetric: bool,
    shape: tuple[int, int],
    float_zero: bool = False,
    k_quants: bool = False,
) -> int:
    """Exact stored bits of one [out, in] weight: codes for the real columns plus a scale (and a
    zero point) for every group, the last partial group of a row included (576 inputs in groups
    of 128 store 5 groups), or 128 bits a super-block where `superblocks_at`. 16 bits: the weight
    kept in fp16/bf16, no group overhead."""
    out_features, in_features = shape
    if bits >= 16:
        return 16 * out_features * in_features
    groups = -(-in_features // group_size)
    superblocks = superblocks_at(bits, group_size, symmetric, float_zero, k_quants, in_features)
    return out_features * (in_features * bits + groups * group_overhead_bits(bits, symmetric, float_zero, superblocks))


def effective_bits(
    bits: int,
    group_size: int,
    symmetric: bool,
    in_features: int | None = None,
    float_zero: bool = False,
    k_quants: bool = False,
) -> float:
    """Stored bits per weight (`stored_bits` / weights). Without `in_features` the row is taken as
    whole groups (no padded partial group) and, under `k_quants`, whole super-blocks: a lower
    bound. 16 means "kept in fp16/bf16": no group overhead."""
    if bits >= 16:
        return 16.0
    if in_features is None:
        superblocks = superblocks_at(bits, group_size, symmetric, float_zero, k_quants)
        return bits + group_overhead_bits(bits, symmetric, float_zero, superblocks) / group_size
    return stored_bits(bits, group_size, symmetric, (1, in_features), float_zero, k_quants) / in_features


@dataclass(frozen=True)
class QuantScheme:
    """The grid every quantized width of a job is stored on (see the module docstring).

    `group_size_by_bits` gives some widths their own group size ((bits, group size) pairs, e.g.
    ((8, 128),) for "8 bits in groups of 128, the rest in groups of `group_size`"). Costs are then
    counted in units of 1/`cost_unit` bit, the lcm of the group sizes, so they stay exact integers.
    """

    group_size: int
    symmetric: bool = False
    float_zero: bool = False
    group_size_by_bits: tuple[tuple[int, int], ...] = ()
    k_quants: bool = False

    def __post_init__(self) -> None:
        for g in self._sizes():
            if isinstance(g, bool) or not isinstance(g, int) or g < 1:
                raise ValueError(f"group_size must be a positive int, got {g!r}")
        if self.float_zero and self.symmetric:
            raise ValueError("float zero points are for asymmetric grids; a symmetric grid has no zero point")
        if self.k_quants and not (self.float_zero or self.symmetric):
            raise ValueError(
                "K-quant super-blocks are float-zero (Q4_K/Q5_K) or symmetric (Q6_K): k_quants needs "
                "float_zero or symmetric"
            )
        widths = [b for b, _ in self.group_size_by_bits]
        if len(set(widths)) != len(widths) or any(b >= 16 for b in widths):
            raise ValueError(f"group_size_by_bits needs distinct widths below 16, got {widths}")
        # one spelling per grid: sorted, and a width at the default size is not listed
        canonical = tuple(sorted((b, g) for b, g in self.group_size_by_bits if g != self.group_size))
        object.__setattr__(self, "group_size_by_bits", canonical)

    def _sizes(self) -> list[int]:
        """Every group size of the scheme: the default and the per-width ones."""
        return [self.group_size, *(g for _, g in self.group_size_by_bits)]

    def group_size_at(self, bits: int) -> int:
        """The group size a weight at `bits` is quantized and stored with."""
        return dict(self.group_size_by_bits).get(bits, self.group_size)

    def group_sizes(self, widths: Iterable[int]) -> list[int]:
        """The distinct group sizes of the quantized widths among `widths`, smallest first."""
        return sorted({self.group_size_at(b) for b in widths if b < 16})

    @property
    def smallest_group_size(self) -> int:
        """The smallest group size of the scheme: the most scales per weight, so size estimates
        made with it are upper bounds."""
        return min(self._sizes())

    @property
    def cost_unit(self) -> int:
        """Costs are exact integers in 1/cost_unit bits: the lcm of every group size."""
        return math.lcm(*self._sizes())

    def superblocks_at(self, bits: int, in_features: int | None = None) -> bool:
        """Whether a weight at `bits` (with `in_features` inputs) is stored in K-quant super-blocks."""
        return superblocks_at(
            bits, self.group_size_at(bits), self.symmetric, self.float_zero, self.k_quants, in_features
        )

    def overhead_bits(self, bits: int) -> int:
        """Stored bits per group besides the codes at `bits` (see `group_overhead_bits`; rows of
        whole super-blocks under `k_quants`)."""
        return group_overhead_bits(bits, self.symmetric, self.float_zero, self.superblocks_at(bits))

    def stored_bits(self, bits: int, shape: tuple[int, int]) -> int:
        """Exact stored bits of one [out, in] weight at `bits` (see `stored_bits`)."""
        return stored_bits(bits, self.group_size_at(bits), self.symmetric, shape, self.float_zero, self.k_quants)

    def effective_bits(self, bits: int, in_features: int | None = None) -> float:
        """Stored bits per weight at `bits` (see `effective_bits`)."""
        return effective_bits(
            bits, self.group_size_at(bits), self.symmetric, in_features, self.float_zero, self.k_quants
        )

    def describe(self) -> str:
        """The grid in words, as messages show it (e.g. "group_size 128, asymmetric")."""
        kind = "symmetric" if self.symmetric else "asymmetric, float zero points" if self.float_zero else "asymmetric"
        if self.k_quants:
            kind += ", K-quant super-blocks"
        own = "".join(f", {b} bits in groups of {g}" for b, g in self.group_size_by_bits)
        return f"group_size {self.group_size}{own}, {kind}"
