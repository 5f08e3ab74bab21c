"""Error-compensating group-wise quantization (GPTQ-style; Frantar et al., 2022), our own code.

Round-to-nearest (`core.quant.primitives.quantize_weight`) rounds every weight on its own. GPTQ
quantizes the input columns of a [out, in] weight one at a time and, after each column, spreads
that column's rounding error over the columns not yet quantized so that the *output* error
‖X Wᵀ − X Ŵᵀ‖² on the calibration inputs (H = XᵀX / n) is minimised, column by column:

    U = upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U)
    for column j:  q_j = quant(w_j);  e_j = (w_j − q_j) / U[j, j];  w_k −= e_j · U[j, k]  (k > j)

Rows are independent given H, so linears that read the same input (q/k/v, gate/up) can be
quantized in one sweep (`gptq_quantize_weights`).

Choices (the output is a `QuantizedWeight` of exactly the shape, dtypes, padding and zero-point
rules of `quantize_weight`, so packing, export and dequantization are unchanged):

* Static groups along the input dimension, in column order (no act-order), so every group maps
  onto the export formats' groups. A group's qparams (scale, zero; `clip_search` included) are
  chosen by the same code as round-to-nearest (`primitives._select_qparams`), on the
  *error-updated* weights of that group at the moment the sweep reaches its first column. The
  codes of a column are clamp(round(w / scale) + zero) with RTN's "maximum on qmax" rule for
  asymmetric groups. Consequently, when H is diagonal (no correlation between inputs, e.g.
  c·I) no error is ever propagated and the result equals `quantize_weight` code for code
  (the one exception: a constant group whose |value| overflows float16).
* Float zero points (`float_zero`, asymmetric widths up to 5 bits): a group's fp16 scale and
  offset come from `primitives.select_float_qparams` on the error-updated weights the same way,
  codes are clamp(round((w − offset) / scale)); with a diagonal H the result again equals
  `quantize_weight(..., float_zero=True)` code for code.
* Dampening: H + damp · mean(diag H) · I (mean over live inputs). The factor U comes from
  `core.quant.factor.inverse_hessian_factor` (one Cholesky of the order-reversed H and one
  triangular inverse, in place in one [in, in] matrix, float64; core.quant.layer: float32 above
  8192 inputs); if the Cholesky fails, or a pivot of H + λI falls below λ / 2 (impossible for a
  positive semi-definite H, so H is indefinite beyond what λ covers), damp is multiplied by 10
  (up to 6 times) before a ValueError. The column sweep runs in float32 on the weight's device.
* Memory: besides the factor, a sweep holds a float32 [in, out] working copy of the stacked rows,
  the block update's product (as large at the first block) and the uint8 codes. Sweeping the
  linears of a group one by one would halve the two float32 terms but not keep the codes bit for
  bit: BLAS rounds a matrix product's entries differently depending on the number of columns
  (MKL on this project's CPUs: 18 of 72 column splits of the block update differed).
* Dead inputs (diag H = 0: the input was 0 on every calibration token) get diag = mean(diag H).
  Their row and column of H are zero, so they are decoupled: no error flows into or out of them
  and their weights are rounded to nearest as they are (not zeroed, as some implementations do,
  so inputs unseen in calibration still see the original weights).
* Lazy batching: the sweep updates only the current block of columns; the rest of the matrix is
  updated once per block with one matrix product. Blocks are whole groups
  (`group_size · max(1, block_size // group_size)` columns), so a group's columns are always up
  to date when its qparams are chosen.
* Deterministic: no randomness; the same inputs on the same device give the same codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from core.quant.factor import DEFAULT_DAMP, inverse_hessian_factor
from core.quant.primitives import (
    _check_weight,
    _Groups,
    _raw_codes,
    _select_qparams,
    _short_groups,
    _stored,
    float_codes,
    select_float_qparams,
    stored_float_zero,
)
from core.scheme import float_zero_at
from core.types import QuantizedWeight

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_DAMP",
    "gptq_quantize_weight",
    "gptq_quantize_weights",
    "inverse_hessian_factor",
]

DEFAULT_BLOCK_SIZE = 128


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int,
    group_size: int,
    symmetric: bool,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
    clip_search: bool = False,
    upper: torch.Tensor | None = None,
    float_zero: bool = False,
) -> QuantizedWeight:
    """Quantize a [out, in] weight with GPTQ given H = XᵀX / n ([in, in]) of its input.

    `upper` is `inverse_hessian_factor(hessian, damp)` when the caller already has it (the
    factor depends on H only, so one serves every width of a layer); `hessian` may then be None.
    Same result type and storage rules as `quantize_weight` (see the module docstring). The sweep
    of `gptq_quantize_weights` over this one weight."""
    return gptq_quantize_weights(
        {"weight": weight},
        hessian,
        bits,
        group_size,
        symmetric,
        damp=damp,
        block_size=block_size,
        clip_search=clip_search,
        upper=upper,
        float_zero=float_zero,
    )["weight"]


def gptq_quantize_weights(
    weights: Mapping[str, torch.Tensor],
    hessian: torch.Tensor | None,
    bits: int,
    group_size: int,
    symmetric: bool,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
    clip_search: bool = False,
    upper: torch.Tensor | None = None,
    float_zero: bool = False,
) -> dict[str, QuantizedWeight]:
    """GPTQ of several weights that read the same input (one shared H) in one column sweep:
    their rows are stacked, quantized together (rows are independent given H) and split again.
    Arguments as in `gptq_quantize_weight`; all on the device of the first weight."""
    if not weights:
        return {}
    names = list(weights)
    if len(names) > 1 and (
        any(w.dim() != 2 for w in weights.values()) or len({int(w.shape[1]) for w in weights.values()}) != 1
    ):
        raise ValueError("weights sharing a Hessian must all be 2-D with the same in_features")
    for name in names:
        _check_weight(weights[name], bits, group_size)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    device = weights[names[0]].device
    upper = _checked_factor(hessian, upper, int(weights[names[0]].shape[1]), damp)
    # the sweep works on its own float32 copy of the stacked rows, built transposed in one copy:
    # [in, sum of out], so that a column of W is a contiguous row
    wt = torch.cat([weights[n_].detach().to(device=device, dtype=torch.float32).T for n_ in names], dim=1)
    floating = float_zero_at(bits, symmetric, float_zero)
    q = _sweep(
        wt, upper.to(device=device, dtype=torch.float32), bits, group_size, symmetric, block_size, clip_search, floating
    )
    del wt
    if len(names) == 1:
        return {names[0]: q}
    out: dict[str, QuantizedWeight] = {}
    start = 0
    for name in names:
        rows = int(weights[name].shape[0])
        sl = slice(start, start + rows)
        out[name] = QuantizedWeight(
            codes=q.codes[sl].contiguous(),
            scale=q.scale[sl].contiguous(),
            zero=None if q.zero is None else q.zero[sl].contiguous(),
            bits=q.bits,
            group_size=q.group_size,
            symmetric=q.symmetric,
            shape=(rows, q.shape[1]),
            offset=None if q.offset is None else q.offset[sl].contiguous(),
        )
        start += rows
    return out


def _checked_factor(
    hessian: torch.Tensor | None, upper: torch.Tensor | None, in_features: int, damp: float
) -> torch.Tensor:
    """`upper` when given, else the factor of `hessian`; either must be [in_features, in_features]."""
    n = in_features
    if upper is None:
        if hessian is None or tuple(hessian.shape) != (n, n):
            raise ValueError(f"hessian must be [{n}, {n}], got {None if hessian is None else tuple(hessian.shape)}")
        return inverse_hessian_factor(hessian, damp)
    if tuple(upper.shape) != (n, n):
        raise ValueError(f"upper must be [{n}, {n}], got {tuple(upper.shape)}")
    return upper


def _sweep(
    wt: torch.Tensor,
    upper: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    block_size: int,
    clip_search: bool,
    floating: bool = False,
) -> QuantizedWeight:
    """The column sweep over `wt`, the float32 transpose [in, out] of the weight, which it
    updates in place (callers pass their own copy): a column of W is a contiguous row, so the
    per-column reads, writes and rank-1 updates touch contiguous memory."""
    in_features, out_features = wt.shape
    qmax = float(2**bits - 1)
    n_groups = math.ceil(in_features / group_size)
    w = wt  # for the device
    codes_t = torch.empty(n_groups * group_size, out_features, dtype=torch.uint8, device=wt.device)
    scale16 = torch.empty(out_features, n_groups, dtype=torch.float16, device=w.device)
    zero = torch.empty(out_features, n_groups, dtype=torch.float32, device=w.device)
    block = group_size * max(1, block_size // group_size)  # whole groups
    for b0 in range(0, in_features, block):
        b1 = min(b0 + block, in_features)
        w1 = wt[b0:b1]  # a view: updated in place
        err1 = torch.empty_like(w1)
        u1 = upper[b0:b1, b0:b1]
        for g0 in range(b0, b1, group_size):
            g1 = min(g0 + group_size, in_features)
            k = g0 // group_size
            # qparams from the group's current (error-updated) weights, padded like RTN
            g = _Groups(w1[g0 - b0 : g1 - b0].T, group_size)
            quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
            if floating:
                s16, o16 = select_float_qparams(g, bits, clip_search)
                scale16[:, k] = s16[:, 0]
                zero[:, k] = o16[:, 0].to(torch.float32)  # `zero` holds the offsets
                s, m = s16[:, 0].to(torch.float32), o16[:, 0].to(torch.float32)

                def quantize(col: torch.Tensor, s: torch.Tensor = s, m: torch.Tensor = m) -> tuple[Any, Any]:
                    c = float_codes(col, s, m, bits)
                    return c, c * s + m

                pad: torch.Tensor | float = 0.0
            else:
                s16, z, const = _select_qparams(g, bits, symmetric, clip_search)
                scale16[:, k] = s16[:, 0]
                zero[:, k] = z[:, 0]
                s, zk = s16[:, 0].to(torch.float32), z[:, 0]
                bump = None
                if not symmetric:  # RTN's rule: a group maximum that rounds to qmax - 1 goes to qmax
                    short = _short_groups(g, _raw_codes(g.w, s16.unsqueeze(-1), z.unsqueeze(-1), bits), bits)
                    bump = (short & ~const)[:, 0]
                    if not bool(bump.any()):
                        bump = None

                def quantize(
                    col: torch.Tensor,
                    s: torch.Tensor = s,
                    zk: torch.Tensor = zk,
                    bump: Any = bump,
                    w_max: Any = g.w_max[:, 0],
                ) -> tuple[Any, Any]:
                    c = _raw_codes(col, s, zk, bits)
                    if bump is not None:
                        c = torch.where(bump & (col >= w_max), qmax, c)
                    return c, (c - zk) * s

                pad = zk
            for j in range(g0, g1):
                i = j - b0
                col = w1[i]
                c, deq = quantize(col)
                codes_t[j] = c
                e = (col - deq) / u1[i, i]
                err1[i] = e
                if i + 1 < b1 - b0:
                    w1[i + 1 :].addr_(u1[i, i + 1 :], e, alpha=-1.0)
            if g1 - g0 < group_size:  # padding of a last partial group: the zero point (0 with an offset)
                codes_t[g1 : (k + 1) * group_size] = pad
        if b1 < in_features:
            wt[b1:].sub_(upper[b0:b1, b1:].T @ err1)
    if floating:
        return stored_float_zero(codes_t.T.contiguous(), scale16, zero, bits, group_size, (out_features, in_features))
    return _stored(codes_t.T.contiguous(), scale16, zero, bits, group_size, symmetric, (out_features, in_features))
