"""K-quant super-blocks (GGUF Q4_K / Q5_K) on the float-zero grid: qparams that a super-block
stores exactly, and the super-block parameters recovered from them.

A Q4_K / Q5_K super-block holds 256 weights in eight groups of 32; group j decodes as
`d · sc_j · code − dmin · m_j` with fp16 `d`, `dmin` per super-block and 6-bit `sc_j`, `m_j`.
That is our float zero point (scale · code + offset) with scale = d · sc_j and offset = −dmin · m_j,
so a weight whose fp16 scales and offsets have that form is stored by the block bit for bit.

- `snap` puts a group's (scale, offset) on that form: offset ≤ 0 (m is unsigned, as llama.cpp's
  own quantizer keeps the range's minimum at or below 0), sc = round(scale / d) in [1, 63],
  m = round(−offset / dmin) in [0, 63].
- `super_scales` chooses d and dmin from a super-block's largest scale and largest −offset, rounded
  *up* to `D_SIGNIFICANT_BITS` significant bits and to at least fp16's smallest normal: then
  d · sc (6 bits) has at most 11 significant bits and is exact in fp16, so the fp16 scale we store
  and measure with is the float32 product llama.cpp decodes.
- `super_params` recovers (d, sc, dmin, m) from stored fp16 scales and offsets: d is the gcd of the
  scales in units of 2⁻²⁴ (every fp16 is a multiple), so sc_j = scale_j / d are the smallest
  integers, at most the quantizer's. A weight not on the form is reported, not approximated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from core.scheme import SUPER_BLOCK, SUPER_GROUP_SIZE

GROUPS_PER_SUPER = SUPER_BLOCK // SUPER_GROUP_SIZE
#: the largest 6-bit sub-scale / sub-min
SUB_MAX = 63
#: significant bits of d and dmin, so that d · sc (sc ≤ 63) fits fp16's 11
D_SIGNIFICANT_BITS = 5
_FP16_MIN_NORMAL = 2.0**-14
_FP16_MAX = 65504.0
_UNIT = 2.0**24  # fp16 values are integers in units of 2^-24


def _round_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float32 ≥ x (x ≥ 0) with at most `D_SIGNIFICANT_BITS` significant bits and at
    least fp16's smallest normal: exactly representable in fp16."""
    mantissa, exponent = torch.frexp(x.clamp(min=_FP16_MIN_NORMAL))
    steps = float(2**D_SIGNIFICANT_BITS)
    return torch.ldexp(torch.ceil(mantissa * steps) / steps, exponent.to(torch.float32))


def _per_super(x: torch.Tensor) -> torch.Tensor:
    """[rows, groups] -> [rows, supers, 8] (groups a multiple of 8)."""
    rows, groups = x.shape
    return x.reshape(rows, groups // GROUPS_PER_SUPER, GROUPS_PER_SUPER)


def super_scales(scale16: torch.Tensor, offset16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (d, dmin) [rows, supers] for groups' fp16 scales and offsets [rows, groups]: the largest
    scale (largest −offset, offsets clamped at 0) over 63, rounded up (module docstring)."""
    top = _per_super(scale16.to(torch.float32).abs()).amax(dim=-1)
    low = _per_super((-offset16.to(torch.float32)).clamp(min=0.0)).amax(dim=-1)
    d = _round_up(top / SUB_MAX).clamp(max=_FP16_MAX)
    dmin = _round_up(low / SUB_MAX).clamp(max=_FP16_MAX)
    return d.to(torch.float16), dmin.to(torch.float16)


def _each_group(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-super-block values [rows, supers] repeated for each of their groups [rows, groups]."""
    return x.repeat_interleave(GROUPS_PER_SUPER, dim=1)[:, :groups]


def snap(
    scale16: torch.Tensor, offset16: torch.Tensor, d16: torch.Tensor, dmin16: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups' fp16 (scale, offset) [rows, groups] on the super-block form d · sc, −dmin · m, with d
    and dmin [rows, supers] (`super_scales`); exact in fp16."""
    groups = scale16.shape[1]
    d = _each_group(d16.to(torch.float32), groups)
    dmin = _each_group(dmin16.to(torch.float32), groups)
    # d · sc must stay finite in fp16 where d is near its top
    sc_max = torch.clamp(torch.floor(_FP16_MAX / d), max=SUB_MAX)
    sc = torch.minimum(torch.round(scale16.to(torch.float32) / d).clamp(min=1.0), sc_max)
    m = torch.round((-offset16.to(torch.float32)).clamp(min=0.0) / dmin).clamp(0.0, SUB_MAX)
    offset = torch.where(m > 0, -(dmin * m), torch.zeros_like(m))
    return (d * sc).to(torch.float16), offset.to(torch.float16)


@dataclass(frozen=True)
class SuperParams:
    """A weight's super-block parameters: fp16 d, dmin [rows, supers] and 6-bit sc, m
    [rows, supers, 8] as uint8, with scale = d · sc and offset = −dmin · m for every group."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor


def _gcd_units(x: torch.Tensor) -> torch.Tensor:
    """[rows, supers, 8] non-negative int64 -> their gcd [rows, supers] (0 when all are 0)."""
    return functools.reduce(torch.gcd, x.unbind(dim=-1))


def _factor(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp16 values ≥ 0 [rows, groups] as (fp16 base [rows, supers], uint8 multiples ≤ 63), or None."""
    units = _per_super(torch.round(values.to(torch.float64) * _UNIT).to(torch.int64))
    base = _gcd_units(units)
    multiples = torch.where(base.unsqueeze(-1) > 0, units // base.clamp(min=1).unsqueeze(-1), torch.zeros_like(units))
    base16 = (base.to(torch.float64) / _UNIT).to(torch.float16)
    if bool((multiples > SUB_MAX).any()) or not bool((base16.to(torch.float64) * _UNIT == base).all()):
        return None
    return base16, multiples.to(torch.uint8)


def super_params(scale16: torch.Tensor, offset16: torch.Tensor) -> SuperParams | None:
    """The super-block parameters of groups' fp16 scales and offsets [rows, groups] (groups a
    multiple of 8), or None when some super-block is not on the form (a negative scale, a positive
    offset, a sub-scale or sub-min above 63)."""
    if scale16.shape[1] % GROUPS_PER_SUPER or bool((scale16 < 0).any()) or bool((offset16 > 0).any()):
        return None
    scales = _factor(scale16)
    mins = _factor(-offset16.to(torch.float32))
    if scales is None or mins is None:
        return None
    return SuperParams(d=scales[0], dmin=mins[0], sc=scales[1], m=mins[1])
