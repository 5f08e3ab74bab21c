"""Error-compensating group-wise quantization (GPTQ-style; Frantar et al., 2022), our own code.

Round-to-nearest (`core.quant.primitives.quantize_weight`) rounds every weight on its own. GPTQ
quantizes the input columns of a [out, in] weight one at a time and, after each column, spreads
that column's rounding error over the columns not yet quantized so that the *output* error
‖X Wᵀ − X Ŵᵀ‖² on the calibration inputs (H = XᵀX / n) is minimised, column by column:

    U = upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U)
    for column j:  q_j = quant(w_j);  e_j = (w_j − q_j) / U[j, j];  w_k −= e_j · U[j, k]  (k > j)

Rows are independent given H, so linears that read the same input (q/k/v, gate/up) can be
quantized in one sweep (`gptq_quantize_weights`), and so can several widths of the same rows
(`gptq_quantize_widths`: one copy of the rows per width side by side; a job measures every width of
its menu, and one sweep pays the per-column steps once, which matters for the groups with few rows:
q/k/v of a 1B-shaped layer 0.67 -> 0.54 s at 4 and 8 bits, while gate/up and down_proj, dominated
by the rank-1 and block updates, do not gain; core.quant.layer uses it where memory allows).

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
* K-quant super-blocks (`k_quants`, core/quant/superblocks.py; Q4_K/Q5_K, and Q6_K for symmetric
  6-bit weights): a super-block's d and dmin are fixed before the sweep from RTN's qparams of the
  unchanged weights, and each group's scale and offset, chosen when the sweep reaches it, are
  snapped onto them (a sub-scale past 63, or 127, clips); with a diagonal H the result equals
  `quantize_weight(..., k_quants=True)` code for code.
* Dampening: H + damp · mean(diag H) · I (mean over live inputs). The factor U comes from
  `core.quant.factor.inverse_hessian_factor` (one Cholesky of the order-reversed H and one
  triangular inverse, in place in one [in, in] matrix, float64; core.quant.layer: float32 above
  8192 inputs); if the Cholesky fails, or a pivot of H + λI falls below λ / 2 (impossible for a
  positive semi-definite H, so H is indefinite beyond what λ covers), damp is multiplied by 10
  (up to 6 times) before a ValueError. The column sweep runs in float32 on the weight's device.
* Memory: besides the factor, a sweep holds per width a float32 [in, out] working copy of the
  stacked rows and the uint8 codes; the block update accumulates into the working copy in place
  (one GEMM with beta = 1, no product temporary: on a 1B-shaped layer under the worker's
  allocator settings that cut the page faults of freshly mapped memory by 45 %). Sweeping the
  linears of a group one by one would shrink the float32 terms but not keep the codes bit for
  bit: BLAS rounds a matrix product's entries differently depending on the number of columns
  (MKL on this project's CPUs: 18 of 72 column splits of the block update differed). For the
  same reason a width swept with others may differ from its own sweep by a few rounding flips.
* Dead inputs (diag H = 0: the input was 0 on every calibration token) get diag = mean(diag H).
  Their row and column of H are zero, so they are decoupled: no error flows into or out of them
  and their weights are rounded to nearest as they are (not zeroed, as some implementations do,
  so inputs unseen in calibration still see the original weights).
* Lazy batching: the sweep updates only the current block of columns; the rest of the matrix is
  updated once per block with one in-place matrix product. Blocks are whole groups
  (`group_size · max(1, block_size // group_size)` columns), so a group's columns are always up
  to date when its qparams are chosen.
* Deterministic: no randomness; the same inputs on the same device give the same codes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from core.quant.factor import DEFAULT_DAMP, inverse_hessian_factor
from core.quant.gptq_sweep import Width, superblock_scales, sweep
from core.quant.primitives import _check_bits, _check_weight
from core.scheme import float_zero_at, superblocks_at
from core.types import QuantizedWeight

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_DAMP",
    "SweptWidths",
    "gptq_quantize_weight",
    "gptq_quantize_weights",
    "gptq_quantize_widths",
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
    k_quants: bool = False,
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
        k_quants=k_quants,
    )["weight"]


@dataclass(frozen=True)
class SweptWidths:
    """What one sweep of `gptq_quantize_widths` gives: `codes[bits][name]`, and the sweep's working
    matrix, which after the sweep holds every width's dequantized rows Ŵᵀ side by side, so a caller
    can measure the output error X·Ŵᵀ without dequantizing the codes again (drop the result to
    free it)."""

    codes: dict[int, dict[str, QuantizedWeight]]
    dequantized_t: torch.Tensor  # [in, widths × stacked rows], float32
    columns: dict[int, dict[str, slice]]  # the columns of dequantized_t holding each width's Ŵᵀ of a weight

    def dequantized(self, bits: int, name: str) -> torch.Tensor:
        """Ŵ [out, in] of one weight at one width: a (transposed) view, equal to
        `dequantize_weight(codes[bits][name])`."""
        return self.dequantized_t[:, self.columns[bits][name]].T


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
    k_quants: bool = False,
) -> dict[str, QuantizedWeight]:
    """GPTQ of several weights that read the same input (one shared H) in one column sweep:
    their rows are stacked, quantized together (rows are independent given H) and split again.
    Arguments as in `gptq_quantize_weight`; all on the device of the first weight."""
    return gptq_quantize_widths(
        weights,
        hessian,
        [bits],
        group_size,
        symmetric,
        damp=damp,
        block_size=block_size,
        clip_search=clip_search,
        upper=upper,
        float_zero=float_zero,
        k_quants=k_quants,
    ).codes[bits]


def gptq_quantize_widths(
    weights: Mapping[str, torch.Tensor],
    hessian: torch.Tensor | None,
    widths: Sequence[int],
    group_size: int,
    symmetric: bool,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
    clip_search: bool = False,
    upper: torch.Tensor | None = None,
    float_zero: bool = False,
    k_quants: bool = False,
) -> SweptWidths:
    """`gptq_quantize_weights` at every width in `widths` (all in groups of `group_size`) in one
    column sweep: a copy of the stacked rows per width sits side by side in the working matrix, so
    the per-column steps and the block updates run once for all widths (a job measures every width
    of its menu; sweeping them one by one repeats the per-column overhead). Each width's rows are
    quantized exactly as in a sweep of their own, up to the rounding of the block update's matrix
    product, whose BLAS blocking depends on the number of columns. Returns the codes and the
    dequantized weights (`SweptWidths`)."""
    if not weights:
        none: dict[int, dict[str, QuantizedWeight]] = {int(b): {} for b in widths}
        return SweptWidths(codes=none, dequantized_t=torch.empty(0, 0), columns={b: {} for b in none})
    names = list(weights)
    if len(names) > 1 and (
        any(w.dim() != 2 for w in weights.values()) or len({int(w.shape[1]) for w in weights.values()}) != 1
    ):
        raise ValueError("weights sharing a Hessian must all be 2-D with the same in_features")
    bits_list = sorted({int(b) for b in widths})
    if not bits_list:
        raise ValueError("widths is empty")
    for bits in bits_list:
        _check_bits(bits)
    for name in names:
        _check_weight(weights[name], bits_list[0], group_size)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    device = weights[names[0]].device
    upper = _checked_factor(hessian, upper, int(weights[names[0]].shape[1]), damp)
    # the sweep works on its own float32 copy of the stacked rows, built transposed in one copy:
    # [in, widths × sum of out], so that a column of W is a contiguous row
    stacked = [weights[n_].detach().to(device=device, dtype=torch.float32).T for n_ in names]
    wt = torch.cat(stacked * len(bits_list), dim=1)
    del stacked
    rows = sum(int(weights[n_].shape[0]) for n_ in names)
    in_features = int(weights[names[0]].shape[1])
    plan = [
        Width(
            bits,
            float_zero_at(bits, symmetric, float_zero),
            i * rows,
            (i + 1) * rows,
            superblock_scales(wt[:, i * rows : (i + 1) * rows].T, bits, symmetric, clip_search)
            if superblocks_at(bits, group_size, symmetric, float_zero, k_quants, in_features)
            else None,
        )
        for i, bits in enumerate(bits_list)
    ]
    swept = sweep(
        wt, upper.to(device=device, dtype=torch.float32), plan, group_size, symmetric, block_size, clip_search
    )
    stacked_rows = _row_slices(names, weights)
    return SweptWidths(
        codes={width.bits: _split(q, stacked_rows) for width, q in zip(plan, swept)},
        dequantized_t=wt,
        columns={
            width.bits: {n: slice(width.start + sl.start, width.start + sl.stop) for n, sl in stacked_rows.items()}
            for width in plan
        },
    )


def _row_slices(names: list[str], weights: Mapping[str, torch.Tensor]) -> dict[str, slice]:
    """Each weight's rows within the stacked rows, in `names` order."""
    out: dict[str, slice] = {}
    start = 0
    for name in names:
        out[name] = slice(start, start + int(weights[name].shape[0]))
        start = out[name].stop
    return out


def _split(q: QuantizedWeight, stacked_rows: dict[str, slice]) -> dict[str, QuantizedWeight]:
    """The stacked result `q` cut back into the weights' rows."""
    if len(stacked_rows) == 1:
        return {next(iter(stacked_rows)): q}
    out: dict[str, QuantizedWeight] = {}
    for name, sl in stacked_rows.items():
        out[name] = QuantizedWeight(
            codes=q.codes[sl].contiguous(),
            scale=q.scale[sl].contiguous(),
            zero=None if q.zero is None else q.zero[sl].contiguous(),
            bits=q.bits,
            group_size=q.group_size,
            symmetric=q.symmetric,
            shape=(sl.stop - sl.start, q.shape[1]),
            offset=None if q.offset is None else q.offset[sl].contiguous(),
        )
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
