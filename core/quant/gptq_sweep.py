"""The GPTQ column sweep (core/quant/gptq.py has the method, its choices and its entry points): one
float32 working matrix [in, rows] holding a copy of the stacked rows per width, swept column by
column with lazy block updates; each width's groups get their qparams from RTN's code on the
error-updated weights."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from core.quant.primitives import (
    _Groups,
    _raw_codes,
    _select_qparams,
    _short_groups,
    _stored,
    float_codes,
    select_float_qparams,
    stored_float_zero,
)
from core.quant.superblocks import GROUPS_PER_SUPER, snap, snap_symmetric, super_scales, symmetric_super_scale
from core.scheme import SUPER_GROUP_SIZE
from core.types import QuantizedWeight

__all__ = ["Width", "superblock_scales", "sweep"]


@dataclass(frozen=True)
class Width:
    """One width of a sweep and the columns [start, stop) of the working matrix holding its copy
    of the stacked rows."""

    bits: int
    floating: bool
    start: int
    stop: int
    #: K-quant super-blocks: fp16 (d, dmin) [rows, supers] (dmin 0 for Q6_K), fixed before the
    #: sweep from the weights' own RTN qparams (the sweep reaches a super-block's groups one at a time)
    superblocks: tuple[torch.Tensor, torch.Tensor] | None = None


#: weights per chunk of `superblock_scales`
_CHUNK_ELEMENTS = 1 << 22

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _group_quantizer(
    w: torch.Tensor,
    width: Width,
    group_size: int,
    symmetric: bool,
    clip_search: bool,
    scale16: torch.Tensor,
    zero: torch.Tensor,
    k: int,
) -> tuple[Quantizer, torch.Tensor | float, tuple[torch.Tensor, ...] | None]:
    """Choose group k's qparams for one width from its current (error-updated) weights `w`
    [group columns, rows], padded like RTN, and store them in `scale16` / `zero` (rows of the
    width). Returns the column quantizer (codes, dequantized), the padding code of a partial last
    group and, for integer zero points, (scale, zero, qmax, bump, maximum) per row so widths can
    be quantized together."""
    bits = width.bits
    qmax = float(2**bits - 1)
    rows = slice(width.start, width.stop)
    g = _Groups(w.T, group_size)
    # this group's super-block (d, dmin) under k_quants
    at = slice(k // GROUPS_PER_SUPER, k // GROUPS_PER_SUPER + 1)
    sb = None if width.superblocks is None else (width.superblocks[0][:, at], width.superblocks[1][:, at])
    if width.floating:
        s16, o16 = select_float_qparams(g, bits, clip_search, superblocks=sb is not None)
        if sb is not None:
            s16, o16 = snap(s16, o16, *sb)
        scale16[rows, k] = s16[:, 0]
        zero[rows, k] = o16[:, 0].to(torch.float32)  # `zero` holds the offsets
        s, m = s16[:, 0].to(torch.float32), o16[:, 0].to(torch.float32)

        def quantize_float(col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = float_codes(col, s, m, bits)
            return c, c * s + m

        return quantize_float, 0.0, None  # the padding of a float zero point: code 0
    s16, z, const = _select_qparams(g, bits, symmetric, clip_search, superblocks=sb is not None)
    if sb is not None:  # Q6_K (the float-zero widths returned above)
        s16 = snap_symmetric(s16, sb[0])
    scale16[rows, k] = s16[:, 0]
    zero[rows, k] = z[:, 0]
    s, zk = s16[:, 0].to(torch.float32), z[:, 0]
    bump = None
    if not symmetric:  # RTN's rule: a group maximum that rounds to qmax - 1 goes to qmax
        short = _short_groups(g, _raw_codes(g.w, s16.unsqueeze(-1), z.unsqueeze(-1), bits), bits)
        bump = (short & ~const)[:, 0]
    w_max = g.w_max[:, 0]
    bumped = bump if bump is not None and bool(bump.any()) else None

    def quantize(col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = _raw_codes(col, s, zk, bits)
        if bumped is not None:
            c = torch.where(bumped & (col >= w_max), qmax, c)
        return c, (c - zk) * s

    flat_bump = bump if bump is not None else torch.zeros_like(w_max, dtype=torch.bool)
    return quantize, zk, (s, zk, torch.full_like(s, qmax), flat_bump, w_max)


def _joint_quantizer(parts: list[tuple[torch.Tensor, ...]]) -> Quantizer:
    """One column quantizer for several integer-zero-point widths side by side: the same
    arithmetic as each width's own (round(w / scale) + zero, clamped to [0, qmax], the bump rule),
    on the concatenated per-row parameters."""
    s, zk, qmax, bump, w_max = (torch.cat(t) for t in zip(*parts))
    bumped = bump if bool(bump.any()) else None

    def quantize(col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.minimum(torch.round(col / s).add_(zk).clamp_min_(0.0), qmax)
        if bumped is not None:
            c = torch.where(bumped & (col >= w_max), qmax, c)
        return c, (c - zk) * s

    return quantize


def superblock_scales(
    weight: torch.Tensor, bits: int, symmetric: bool, clip_search: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (d, dmin) [rows, supers] of a [rows, in] weight's K-quant super-blocks (dmin 0 for
    Q6_K), from RTN's qparams of the weight before any error update (`Width.superblocks`); in row
    chunks, so a clip search's temporaries stay small next to the sweep's working matrix."""

    def scales(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = _Groups(chunk, SUPER_GROUP_SIZE)
        if symmetric:
            d = symmetric_super_scale(_select_qparams(g, bits, True, clip_search, superblocks=True)[0])
            return d, torch.zeros_like(d)
        return super_scales(*select_float_qparams(g, bits, clip_search, superblocks=True))

    rows = max(1, _CHUNK_ELEMENTS // int(weight.shape[1]))
    parts = [scales(chunk) for chunk in torch.split(weight, rows)]
    return torch.cat([d for d, _ in parts]), torch.cat([m for _, m in parts])


def sweep(
    wt: torch.Tensor,
    upper: torch.Tensor,
    plan: list[Width],
    group_size: int,
    symmetric: bool,
    block_size: int,
    clip_search: bool,
) -> list[QuantizedWeight]:
    """The column sweep over `wt`, the float32 transpose [in, out] of the weight (one copy per
    width of `plan`, side by side), which it updates in place (callers pass their own copy): a
    column of W is a contiguous row, so the per-column reads, writes and rank-1 updates touch
    contiguous memory. Each finished column is overwritten with its dequantized values, so on
    return `wt` holds every width's Ŵᵀ, exactly `dequantize_weight` of the returned codes."""
    in_features, out_features = wt.shape
    n_groups = math.ceil(in_features / group_size)
    codes_t = torch.empty(n_groups * group_size, out_features, dtype=torch.uint8, device=wt.device)
    # fp16 scales, float32 where a width is on K-quant super-blocks (d · sc; see stored_float_zero)
    super_widths = any(p.superblocks is not None for p in plan)
    scale16 = torch.empty(
        out_features, n_groups, dtype=torch.float32 if super_widths else torch.float16, device=wt.device
    )
    zero = torch.empty(out_features, n_groups, dtype=torch.float32, device=wt.device)
    block = group_size * max(1, block_size // group_size)  # whole groups
    for b0 in range(0, in_features, block):
        b1 = min(b0 + block, in_features)
        w1 = wt[b0:b1]  # a view: updated in place
        err1 = torch.empty_like(w1)
        u1 = upper[b0:b1, b0:b1]
        for g0 in range(b0, b1, group_size):
            g1 = min(g0 + group_size, in_features)
            k = g0 // group_size
            chosen = [
                _group_quantizer(
                    w1[g0 - b0 : g1 - b0, p.start : p.stop], p, group_size, symmetric, clip_search, scale16, zero, k
                )
                for p in plan
            ]
            quantize = chosen[0][0] if len(plan) == 1 else _together(chosen, plan)
            for j in range(g0, g1):
                i = j - b0
                col = w1[i]
                c, deq = quantize(col)
                codes_t[j] = c
                e = (col - deq) / u1[i, i]
                err1[i] = e
                col.copy_(deq)  # the column is done: it keeps Ŵ for the caller's error measurement
                if i + 1 < b1 - b0:
                    w1[i + 1 :].addr_(u1[i, i + 1 :], e, alpha=-1.0)
            if g1 - g0 < group_size:  # padding of a last partial group: the zero point (0 with an offset)
                for (_, pad, _), p in zip(chosen, plan):
                    codes_t[g1 : (k + 1) * group_size, p.start : p.stop] = pad
        if b1 < in_features:
            # the rest of the matrix, accumulated in place (GEMM with beta = 1): no temporary
            wt[b1:].addmm_(upper[b0:b1, b1:].T, err1, alpha=-1.0)
    out: list[QuantizedWeight] = []
    for p in plan:
        codes = codes_t[:, p.start : p.stop].T.contiguous()
        shape = (p.stop - p.start, in_features)
        scale, zp = scale16[p.start : p.stop].contiguous(), zero[p.start : p.stop].contiguous()
        if p.superblocks is None:
            scale = scale.to(torch.float16)  # exact: the buffer is float32 only for super-block widths
        if p.floating:
            out.append(stored_float_zero(codes, scale, zp, p.bits, group_size, shape))
        else:
            out.append(_stored(codes, scale, zp, p.bits, group_size, symmetric, shape))
    return out


def _together(chosen: list[tuple[Quantizer, Any, tuple[torch.Tensor, ...] | None]], plan: list[Width]) -> Quantizer:
    """The column quantizer of several widths: one joint quantizer when all have integer zero
    points, else each width's own on its slice of the column."""
    params = [c[2] for c in chosen]
    if all(p is not None for p in params):
        return _joint_quantizer([p for p in params if p is not None])
    quantizers = [(c[0], p) for c, p in zip(chosen, plan)]

    def quantize(col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [q(col[p.start : p.stop]) for q, p in quantizers]
        return torch.cat([c for c, _ in parts]), torch.cat([d for _, d in parts])

    return quantize
