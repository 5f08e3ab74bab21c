"""K-quant super-blocks (GGUF Q4_K / Q5_K) on the float-zero grid: qparams that a super-block
stores exactly, and the super-block parameters recovered from them.

A Q4_K / Q5_K super-block holds 256 weights in eight groups of 32; group j decodes as
`d · sc_j · code − dmin · m_j` with fp16 `d`, `dmin` per super-block and 6-bit `sc_j`, `m_j`
(llama.cpp computes d · sc and dmin · m in float32). That is our float zero point
(scale · code + offset) with scale = d · sc_j and offset = −dmin · m_j, both exact in float32
(11 × 6 significant bits), so such a weight keeps float32 scales and offsets (everywhere else
they are fp16) and a super-block stores it bit for bit.

- `super_scales` chooses d (dmin) as the fp16 nearest to the super-block's largest scale (largest
  −offset) over 63, as llama.cpp's quantizer does; a source stored as Q4_K whose groups span
  their levels 0-15 (ranges d · sc_j) then gets its own d back.
- `snap` puts each group on that form: sc = round(scale / d) in [1, 63], m = round(−offset / dmin)
  in [0, 63]; offsets are kept ≤ 0 (m is unsigned, and llama.cpp keeps each range's minimum at or
  below 0).
- `super_params` recovers (d, sc, dmin, m) from stored scales and offsets: the gcd of a
  super-block's scales in units of 2⁻²⁴ (every fp16 d · sc is a multiple) is d · gcd(sc), and
  dividing it by the smallest k ≤ 63 that leaves an fp16 gives a d whose multiples are all ≤ 63.
  A weight not on the form is reported (None), never approximated.

Q6_K (symmetric 6-bit weights): sixteen sub-blocks of 16 decode as `d · sc_j · (q − 32)` with int8
sc_j; our symmetric groups of 32 (scale · (code − 32), the scale negative where the group's largest
magnitude is positive) are two sub-blocks each with the group's sc. `symmetric_super_scale`,
`snap_symmetric` and `symmetric_params` do the same as above with |sc| ≤ 127 and no offset.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from core.scheme import SUPER_BLOCK, SUPER_GROUP_SIZE

GROUPS_PER_SUPER = SUPER_BLOCK // SUPER_GROUP_SIZE
#: the largest 6-bit sub-scale / sub-min (Q4_K, Q5_K) and int8 sub-scale magnitude (Q6_K)
SUB_MAX = 63
SIGNED_SUB_MAX = 127
_FP16_MIN_SUBNORMAL = 2.0**-24
_FP16_MAX = 65504.0
_UNIT = 2.0**24  # d · sc with an fp16 d is an integer number of 2^-24


def _per_super(x: torch.Tensor) -> torch.Tensor:
    """[rows, groups] -> [rows, supers, 8] (groups a multiple of 8)."""
    rows, groups = x.shape
    return x.reshape(rows, groups // GROUPS_PER_SUPER, GROUPS_PER_SUPER)


def _super_base(values: torch.Tensor, limit: int) -> torch.Tensor:
    """fp16 [rows, supers]: each super-block's largest of `values` ≥ 0 [rows, groups] over `limit`,
    to the nearest fp16 and finite (weights past fp16's range get its largest value)."""
    top = _per_super(values.to(torch.float32)).amax(dim=-1)
    return (top / limit).clamp(max=_FP16_MAX).to(torch.float16)


def super_scales(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (d, dmin) [rows, supers] for groups' scales and offsets [rows, groups]: the largest
    scale (largest −offset, offsets clamped at 0) over 63, to the nearest fp16 (d at least fp16's
    smallest subnormal)."""
    d = _super_base(scale.abs(), SUB_MAX).clamp(min=_FP16_MIN_SUBNORMAL)
    return d, _super_base((-offset.to(torch.float32)).clamp(min=0.0), SUB_MAX)


def _each_group(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-super-block values [rows, supers] repeated for each of their groups [rows, groups]."""
    return x.repeat_interleave(GROUPS_PER_SUPER, dim=1)[:, :groups]


def snap(
    scale: torch.Tensor, offset: torch.Tensor, d16: torch.Tensor, dmin16: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups' float32 (scale, offset) [rows, groups] on the super-block form d · sc, −dmin · m,
    with fp16 d and dmin [rows, supers] (`super_scales`)."""
    groups = scale.shape[1]
    d = _each_group(d16.to(torch.float32), groups)
    dmin = _each_group(dmin16.to(torch.float32), groups)
    sc = torch.round(scale.to(torch.float32) / d).clamp(1.0, SUB_MAX)
    lows = (-offset.to(torch.float32)).clamp(min=0.0)
    m = torch.where(dmin > 0, torch.round(lows / torch.where(dmin > 0, dmin, 1.0)), 0.0).clamp(0.0, SUB_MAX)
    return d * sc, torch.where(m > 0, -(dmin * m), torch.zeros_like(m))


@dataclass(frozen=True)
class SuperParams:
    """A weight's super-block parameters: fp16 d, dmin [rows, supers] and 6-bit sc, m
    [rows, supers, 8] as uint8, with scale = d · sc and offset = −dmin · m for every group."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor


def _factor(values: torch.Tensor, limit: int = SUB_MAX) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Values ≥ 0 [rows, groups] as (fp16 base [rows, supers], uint8 multiples ≤ `limit`), or None."""
    exact = values.to(torch.float64) * _UNIT
    units = _per_super(torch.round(exact).to(torch.int64))
    if not bool((units.to(torch.float64) == _per_super(exact)).all()):
        return None  # not a multiple of 2^-24: no fp16 d times an integer gives it
    common = functools.reduce(torch.gcd, units.unbind(dim=-1))  # d · gcd(sc); 0 when all are 0
    base = torch.zeros(common.shape, dtype=torch.float64)
    found = common == 0
    for k in range(1, limit + 1):  # the smallest k with common / k an fp16 whose multiples fit
        candidate = common.to(torch.float64) / (k * _UNIT)
        fits = (candidate.to(torch.float16).to(torch.float64) == candidate) & (
            units.amax(dim=-1).to(torch.float64) <= limit * candidate * _UNIT
        )
        take = fits & ~found
        base = torch.where(take, candidate, base)
        found |= take
        if bool(found.all()):
            break
    if not bool(found.all()):
        return None
    step = (base * _UNIT).unsqueeze(-1)
    multiples = torch.where(step > 0, units.to(torch.float64) / torch.where(step > 0, step, 1.0), 0.0)
    if not bool((multiples == torch.round(multiples)).all()):
        return None
    return base.to(torch.float16), multiples.to(torch.uint8)


def super_params(scale: torch.Tensor, offset: torch.Tensor) -> SuperParams | None:
    """The super-block parameters of groups' scales and offsets [rows, groups] (groups a multiple
    of 8), or None when some super-block is not on the form (a negative scale, a positive offset,
    a sub-scale or sub-min that no fp16 d keeps within 63)."""
    if scale.shape[1] % GROUPS_PER_SUPER or bool((scale < 0).any()) or bool((offset > 0).any()):
        return None
    scales = _factor(scale)
    mins = _factor(-offset.to(torch.float32))
    if scales is None or mins is None:
        return None
    return SuperParams(d=scales[0], dmin=mins[0], sc=scales[1], m=mins[1])


def symmetric_super_scale(scale: torch.Tensor) -> torch.Tensor:
    """fp16 d [rows, supers] of symmetric groups' scales [rows, groups]: the largest |scale| over
    127 to the nearest fp16 (at least fp16's smallest subnormal)."""
    return _super_base(scale.abs(), SIGNED_SUB_MAX).clamp(min=_FP16_MIN_SUBNORMAL)


def snap_symmetric(scale: torch.Tensor, d16: torch.Tensor) -> torch.Tensor:
    """Symmetric groups' float32 scales [rows, groups] as d · sc, int8 sc in [−127, 127] and never 0
    (a zero scale, from an all-zero group, becomes d)."""
    d = _each_group(d16.to(torch.float32), scale.shape[1])
    sc = torch.round(scale.to(torch.float32) / d).clamp(-SIGNED_SUB_MAX, SIGNED_SUB_MAX)
    return d * torch.where(sc == 0, torch.where(scale < 0, -1.0, 1.0), sc)


@dataclass(frozen=True)
class SymmetricParams:
    """A symmetric weight's Q6_K parameters: fp16 d [rows, supers] and int8 sc [rows, supers, 8]
    (one per group of 32) with scale = d · sc."""

    d: torch.Tensor
    sc: torch.Tensor


def symmetric_params(scale: torch.Tensor) -> SymmetricParams | None:
    """The Q6_K parameters of symmetric groups' scales [rows, groups] (groups a multiple of 8), or
    None when some super-block's scales are not int8 multiples of one fp16 d."""
    if scale.shape[1] % GROUPS_PER_SUPER:
        return None
    factored = _factor(scale.to(torch.float32).abs(), SIGNED_SUB_MAX)
    if factored is None:
        return None
    sign = torch.where(_per_super(scale) < 0, -1, 1).to(torch.int16)
    return SymmetricParams(d=factored[0], sc=(factored[1].to(torch.int16) * sign).to(torch.int8))
