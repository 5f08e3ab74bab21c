"""Group-wise integer weight quantization: quantize and dequantize (error measures:
core/quant/metrics.py).

Conventions (see `core.types.QuantizedWeight`): groups run along the input dimension; codes are
unsigned; `w ≈ scale * (code - zero)`; scales are float16.

Reproducibility: qparams are computed in float32, the scale is rounded to float16 *first* and the
codes are computed with that float16 scale, so any runtime that dequantizes with the stored
float16 scale reproduces the numbers we measured. `(code - zero) * scale` is exact in float32
(an integer of at most 9 bits times an 11-bit mantissa), so `dequantize_weight` in float32 is
bit-exact on every device.

Scale choice:
- asymmetric: range [min(w_min, 0), max(w_max, 0)] mapped onto [0, 2^b - 1] with an integer zero
  point. Zero is kept inside the range (as GPTQ / compressed-tensors do) because an all-positive
  group would otherwise need a zero point below 0, which uint8 cannot hold. The group's extremes
  always get codes 0 and 2^b - 1 (the top one is bumped in the rare case where float16 rounding
  of the scale leaves it one code short), which makes quantization idempotent:
  `quantize(dequantize(q))` reproduces `q` exactly.
- symmetric: zero = 2^(b-1), signed levels [-2^(b-1), 2^(b-1) - 1] and, like llama.cpp's Q4_0,
  scale = m / -2^(b-1) where m is the value of largest magnitude (with its sign; ties pick the
  negative one). m is reproduced exactly by code 0 and the step is the finest that covers the
  group; values on the other side beyond (2^(b-1) - 1)·|scale| clip by less than one step. So the
  scale is NEGATIVE when m > 0. Measured on Gaussian groups of 128 this beats the positive
  "half step" rule 2·absmax / (2^b - 1) by +2.3 dB (2 bit), +1.2 dB (3 bit), +0.6 dB (4 bit),
  beats the tightest positive no-clip rule max(-min/2^(b-1), max/(2^(b-1) - 1)) by more, is
  idempotent like the asymmetric scheme, and a 4-bit group of 32 maps 1:1 onto GGUF Q4_0.
  Exporters must therefore not assume scale > 0 for symmetric weights.
- constant groups (all real values equal to c, including a last group with a single real column)
  are stored as |scale| = |c|, code - zero = ±1, so they round-trip exactly whenever c is
  representable in float16 (a zero range would otherwise give scale 0 / NaN).
- a scale whose magnitude underflows float16 becomes ±2^-24 and one that overflows becomes
  ±65504, so a scale is never 0, inf or NaN.

- float zero point (`float_zero`, asymmetric widths up to `FLOAT_ZERO_MAX_BITS`, as GGUF's
  Q4_1/Q5_1 and HQQ store it): w ≈ scale · code + offset with offset = the group's minimum and
  scale = range / (2^b - 1), both float16, codes computed with the stored float16 values. The
  range need not contain 0, so a group of one sign does not waste levels; a source that was
  itself stored this way (a Q4_1 GGUF at group 32) is reproduced exactly. Offsets are float16, so
  a group whose range is tiny against its magnitude loses the levels the offset's rounding costs.
  Constant groups get scale 1, offset c, code 0. Not idempotent in general (the offset rounds).
- K-quant super-blocks (`k_quants`, float zero points at 4/5 bits, groups of 32, 256 | in): the
  offsets are kept ≤ 0 and scales and offsets are then snapped to 6-bit multiples of one fp16 value
  per 256 weights (core/quant/superblocks.py), kept in float32 (exact), so GGUF's Q4_K / Q5_K
  store them bit for bit; symmetric 6-bit scales likewise on int8 multiples (Q6_K).

Padding: when `group_size` does not divide `in_features` the last group is padded; its qparams
come only from the real columns and padded codes equal the zero point (0 with a float zero
point); readers drop the padding columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from core.quant.superblocks import snap, snap_symmetric, super_scales, symmetric_super_scale
from core.scheme import float_zero_at, superblocks_at
from core.types import QuantizedWeight

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
#: Shrink factors of the range tried by `clip_search` (1.0 first, so clipping never loses).
CLIP_STEPS = 20
CLIP_MIN_SHRINK = 0.8

_FP16_MAX = 65504.0
_FP16_MIN_SUBNORMAL = 2.0**-24


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)} (16 means 'keep'), got {bits}")


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round float32 scales to float16 keeping the sign, never producing 0, inf or NaN."""
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))  # zero range -> any non-zero
    scale16 = scale.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
    tiny = torch.where(scale > 0, _FP16_MIN_SUBNORMAL, -_FP16_MIN_SUBNORMAL).to(torch.float16)
    return torch.where(scale16 != 0, scale16, tiny)


class _Groups:
    """The weight as [out, n_groups, group_size] float32 with a mask of real (non-padding) columns."""

    def __init__(self, weight: torch.Tensor, group_size: int) -> None:
        out_features, in_features = weight.shape
        self.n_groups = math.ceil(in_features / group_size)
        pad = self.n_groups * group_size - in_features
        w = weight.detach().to(torch.float32)
        if pad:
            w = torch.nn.functional.pad(w, (0, pad))
        self.w = w.reshape(out_features, self.n_groups, group_size)
        cols = torch.arange(self.n_groups * group_size, device=weight.device)
        self.mask = (cols < in_features).reshape(1, self.n_groups, group_size)
        self.padded = pad > 0  # without padding the mask is all True: no masked copies needed
        if self.padded:
            inf = torch.tensor(float("inf"), device=weight.device)
            self.w_min = torch.where(self.mask, self.w, inf).amin(dim=-1)
            self.w_max = torch.where(self.mask, self.w, -inf).amax(dim=-1)
        else:
            self.w_min, self.w_max = self.w.amin(dim=-1), self.w.amax(dim=-1)


def _qparams(
    g: _Groups, bits: int, symmetric: bool, shrink: float, superblocks: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scale, float32 integer zero) per group for a range shrunk by `shrink` (a symmetric
    scale unrounded float32 on K-quant super-blocks, which snap it to d · sc next)."""
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        # signed value of largest magnitude; ties take the negative one (positive scale)
        m = torch.where(-g.w_min >= g.w_max, g.w_min, g.w_max) * shrink
        scale16 = m / -half if superblocks else _fp16_scale(m / -half)
        return scale16, torch.full_like(m, float(half))
    lo = torch.clamp(g.w_min * shrink, max=0.0)
    hi = torch.clamp(g.w_max * shrink, min=0.0)
    scale16 = _fp16_scale((hi - lo) / qmax)
    zero = torch.clamp(torch.round(-lo / scale16.to(torch.float32)), 0, qmax)
    return scale16, zero


def _raw_codes(w: torch.Tensor, scale16: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 codes clamp(round(w / scale) + zero); `scale16` and `zero` broadcast against `w`."""
    # in place after the division: one temporary the size of `w`, not four (same values)
    return (w / scale16.to(torch.float32)).round_().add_(zero).clamp_(0, 2**bits - 1)


def _short_groups(g: _Groups, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[out, n_groups] bool: asymmetric groups whose positive maximum landed on qmax - 1."""
    qmax = 2**bits - 1
    real = codes.masked_fill(~g.mask, 0) if g.padded else codes
    short: torch.Tensor = (g.w_max > 0) & (real.amax(dim=-1) == qmax - 1)
    return short


def _codes(g: _Groups, scale16: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """float32 codes (integers) of every column, padding set to the zero point."""
    qmax = 2**bits - 1
    z = zero.unsqueeze(-1)
    codes = _raw_codes(g.w, scale16.unsqueeze(-1), z, bits)
    if not symmetric:
        # fp16 rounding of the scale can leave a positive maximum at qmax - 1 (both ends' fractions
        # just under .5); it then goes to qmax (error ≤ ~0.63 step instead of ~0.37) so the
        # extremes always sit on 0 and qmax and requantizing the dequantized weight is exact.
        short = _short_groups(g, codes, bits)
        at_max = g.mask & (g.w == g.w_max.unsqueeze(-1)) & short.unsqueeze(-1)
        codes = torch.where(at_max, torch.full_like(codes, float(qmax)), codes)
    return torch.where(g.mask, codes, z.expand_as(codes))


def _masked_sq_error(g: _Groups, deq: torch.Tensor) -> torch.Tensor:
    """[out, n_groups] squared error of dequantized groups over the real columns."""
    diff = torch.where(g.mask, deq - g.w, torch.zeros((), device=deq.device))
    return diff.square().sum(dim=-1)


def _group_sq_error(g: _Groups, codes: torch.Tensor, scale16: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return _masked_sq_error(g, (codes - zero.unsqueeze(-1)) * scale16.to(torch.float32).unsqueeze(-1))


def _best_shrink(
    g: _Groups,
    params_at: Callable[[float], tuple[torch.Tensor, torch.Tensor]],
    error_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the qparams pair `params_at(shrink)` with the smallest `error_of(pair)` over
    `CLIP_STEPS` shrinks from 1.0 down to `CLIP_MIN_SHRINK` (strict: ties keep the larger range)."""
    first, second = params_at(1.0)
    best = error_of(first, second)
    for shrink in torch.linspace(1.0, CLIP_MIN_SHRINK, CLIP_STEPS).tolist()[1:]:
        a, b = params_at(shrink)
        err = error_of(a, b)
        better = err < best
        best = torch.where(better, err, best)
        first = torch.where(better, a, first)
        second = torch.where(better, b, second)
    return first, second


def _check_weight(weight: torch.Tensor, bits: int, group_size: int) -> None:
    _check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if weight.numel() == 0:
        raise ValueError("weight is empty")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight has NaN or inf values")


def _const_step(g: _Groups) -> torch.Tensor:
    """code - zero of a constant group: sign(c), or 0 when |c| rounds to 0 in float16."""
    c16 = g.w_max.abs().clamp(max=_FP16_MAX).to(torch.float16)
    return torch.where(c16 > 0, torch.sign(g.w_max), torch.zeros_like(g.w_max))


def _select_qparams(
    g: _Groups, bits: int, symmetric: bool, clip_search: bool, superblocks: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp16 scale, float32 zero, constant-group mask) per group, as `quantize_weight` chooses
    them: the full range, or the best shrink of it under `clip_search`, then the constant-group
    rule (scale |c|, code - zero = sign(c)); float32 scales for symmetric K-quant super-blocks
    (`_qparams`). Shared with the GPTQ quantizer."""
    if clip_search:
        scale16, zero = _best_shrink(
            g,
            lambda shrink: _qparams(g, bits, symmetric, shrink, superblocks),
            lambda s16, z: _group_sq_error(g, _codes(g, s16, z, bits, symmetric), s16, z),
        )
    else:
        scale16, zero = _qparams(g, bits, symmetric, 1.0, superblocks)

    # Constant groups: scale = |c| and code - zero = sign(c) is exact for fp16-representable c.
    const = g.w_min == g.w_max
    if bool(const.any()):
        c16 = g.w_max.abs().clamp(max=_FP16_MAX).to(torch.float16)
        nonzero = const & (c16 > 0)
        if not symmetric:  # zero point 0 for c > 0 (code 1), 1 for c < 0 (code 0)
            zero = torch.where(const, torch.where(nonzero & (g.w_max < 0), 1.0, 0.0), zero)
        scale16 = torch.where(const, torch.where(nonzero, c16, torch.ones_like(c16)), scale16)
    return scale16, zero, const


def _float_qparams(
    g: _Groups, bits: int, shrink: float, superblocks: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scale, fp16 offset) per group for the range [min, max] shrunk by `shrink`; for K-quant
    super-blocks float32 ones, not rounded (they are snapped to d · sc next), with the range's start
    kept at or below 0 as the super-block stores it."""
    lo, hi = g.w_min * shrink, g.w_max * shrink
    if superblocks:
        lo = lo.clamp(max=0.0)
        return (hi - lo) / (2**bits - 1), lo
    scale16 = _fp16_scale((hi - lo) / (2**bits - 1))  # a constant group: 0 -> 1
    return scale16, lo.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)


def float_codes(w: torch.Tensor, scale16: torch.Tensor, offset16: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 codes clamp(round((w - offset) / scale)); `scale16`, `offset16` broadcast against `w`."""
    q = torch.round((w - offset16.to(torch.float32)) / scale16.to(torch.float32))
    return torch.clamp(q, 0, 2**bits - 1)


def _float_group_codes(g: _Groups, scale16: torch.Tensor, offset16: torch.Tensor, bits: int) -> torch.Tensor:
    codes = float_codes(g.w, scale16.unsqueeze(-1), offset16.unsqueeze(-1), bits)
    return torch.where(g.mask, codes, torch.zeros_like(codes))


def _float_sq_error(g: _Groups, codes: torch.Tensor, scale16: torch.Tensor, offset16: torch.Tensor) -> torch.Tensor:
    return _masked_sq_error(
        g, codes * scale16.to(torch.float32).unsqueeze(-1) + offset16.to(torch.float32).unsqueeze(-1)
    )


def select_float_qparams(
    g: _Groups, bits: int, clip_search: bool, superblocks: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scale, fp16 offset) per group: the full range, or under `clip_search` the shrink of it
    with the smallest squared error (1.0 first; ties keep the larger range); for K-quant
    super-blocks unrounded float32 ones with offsets ≤ 0 (`_float_qparams`). Shared with GPTQ."""
    if not clip_search:
        return _float_qparams(g, bits, 1.0, superblocks)
    return _best_shrink(
        g,
        lambda shrink: _float_qparams(g, bits, shrink, superblocks),
        lambda s16, o16: _float_sq_error(g, _float_group_codes(g, s16, o16, bits), s16, o16),
    )


def _quantize_float_zero(
    weight: torch.Tensor, bits: int, group_size: int, clip_search: bool, superblocks: bool
) -> QuantizedWeight:
    g = _Groups(weight, group_size)
    scale16, offset16 = select_float_qparams(g, bits, clip_search, superblocks)
    if superblocks:  # K-quant super-blocks: qparams on their 6-bit grid (core/quant/superblocks.py)
        scale16, offset16 = snap(scale16, offset16, *super_scales(scale16, offset16))
    codes = _float_group_codes(g, scale16, offset16, bits)
    out_features, in_features = weight.shape
    codes = codes.reshape(out_features, g.n_groups * group_size)
    return stored_float_zero(codes, scale16, offset16, bits, group_size, (out_features, in_features))


def stored_float_zero(
    codes: torch.Tensor,
    scale16: torch.Tensor,
    offset16: torch.Tensor,
    bits: int,
    group_size: int,
    shape: tuple[int, int],
) -> QuantizedWeight:
    """`_stored`'s rules for a float zero point: uint8 codes, float16 scales and offsets (float32
    both on K-quant super-blocks, whose d · sc and dmin · m fp16 cannot hold)."""
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scale=scale16.contiguous(),
        zero=None,
        bits=bits,
        group_size=group_size,
        symmetric=False,
        shape=(int(shape[0]), int(shape[1])),
        offset=offset16.to(scale16.dtype).contiguous(),
    )


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip_search: bool = False,
    float_zero: bool = False,
    k_quants: bool = False,
) -> QuantizedWeight:
    """Quantize a [out, in] weight group-wise along `in` (see the module docstring for the scheme).

    `clip_search` tries `CLIP_STEPS` shrink factors of the range from 1.0 down to
    `CLIP_MIN_SHRINK` and keeps, per group, the one with the smallest squared error (ties keep
    the larger range). 1.0 is tried first, so the result is never worse than without the search.
    `float_zero` stores asymmetric widths up to 5 bits with a float zero point (module docstring);
    `k_quants` puts those at 4 and 5 bits, and symmetric 6-bit weights, in groups of 32 with
    256 | in on K-quant super-blocks (Q4_K / Q5_K / Q6_K).
    """
    _check_weight(weight, bits, group_size)
    superblocks = superblocks_at(bits, group_size, symmetric, float_zero, k_quants, int(weight.shape[1]))
    if float_zero_at(bits, symmetric, float_zero):
        return _quantize_float_zero(weight, bits, group_size, clip_search, superblocks)
    g = _Groups(weight, group_size)
    scale16, zero, const = _select_qparams(g, bits, symmetric, clip_search, superblocks)
    if superblocks:  # Q6_K: int8 multiples of one fp16 d per 256 weights (core/quant/superblocks.py)
        scale16 = snap_symmetric(scale16, symmetric_super_scale(scale16))
    codes = _codes(g, scale16, zero, bits, symmetric)
    if bool(const.any()):
        # constant groups: code - zero = sign(c) exactly (`_codes` gives the same except where |c|
        # overflows float16)
        fill = torch.where(g.mask, (zero + _const_step(g)).unsqueeze(-1), zero.unsqueeze(-1))
        codes = torch.where(const.unsqueeze(-1), fill, codes)

    out_features, in_features = weight.shape
    codes = codes.reshape(out_features, g.n_groups * group_size)
    return _stored(codes, scale16, zero, bits, group_size, symmetric, (out_features, in_features))


def _stored(
    codes: torch.Tensor,
    scale16: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    shape: tuple[int, int],
) -> QuantizedWeight:
    """The storage rules every quantizer follows (RTN here, GPTQ in `core.quant.gptq`): uint8 codes
    [out, n_groups · group_size], float16 scales [out, n_groups], uint8 zero points (none when
    symmetric: the zero point is the constant 2**(bits-1)), the weight's [out, in]."""
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scale=scale16.contiguous(),
        zero=None if symmetric else zero.to(torch.uint8),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        shape=(int(shape[0]), int(shape[1])),
    )


def dequantize_weight(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in] weight `scale * (code - zero)` (`scale * code + offset` with a float zero point)
    with the padding columns dropped.

    Computed in float32 (exact for integer zero points, see module docstring; with an offset the
    one float32 addition GGML's Q4_1/Q5_1 dequantization also does) and then cast to `dtype`.
    """
    out_features, in_features = q.shape
    if q.codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {q.codes.dtype}")
    codes = q.codes.reshape(out_features, q.n_groups, q.group_size).to(torch.float32)
    if q.offset is not None:
        scale = q.scale.to(device=codes.device, dtype=torch.float32).unsqueeze(-1)
        offset = q.offset.to(device=codes.device, dtype=torch.float32).unsqueeze(-1)
        deq = (codes * scale + offset).reshape(out_features, q.n_groups * q.group_size)
        return deq[:, :in_features].to(dtype)
    zero = q.zero_points().to(device=codes.device, dtype=torch.float32).unsqueeze(-1)
    scale = q.scale.to(device=codes.device, dtype=torch.float32).unsqueeze(-1)
    deq = ((codes - zero) * scale).reshape(out_features, q.n_groups * q.group_size)
    return deq[:, :in_features].to(dtype)
