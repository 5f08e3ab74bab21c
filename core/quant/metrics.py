"""Error measures of a quantized weight against its source (tests, benches and reports; the layer
pass measures its errors on the recorded inputs in core/quant/layer.py)."""

from __future__ import annotations

import math

import torch

from core.quant.primitives import dequantize_weight
from core.types import QuantizedWeight

__all__ = ["quantization_error", "sqnr_db"]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(‖ref‖² / ‖ref − approx‖²) in dB.

    inf when the approximation is exact; -inf when the reference is all zeros and approx is not.
    """
    if reference.shape != approx.shape:
        raise ValueError(f"shape mismatch: {tuple(reference.shape)} vs {tuple(approx.shape)}")
    ref = reference.detach().to(torch.float64)
    noise = float((ref - approx.detach().to(device=ref.device, dtype=torch.float64)).square().sum())
    signal = float(ref.square().sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def quantization_error(weight: torch.Tensor, q: QuantizedWeight, hessian: torch.Tensor | None = None) -> float:
    """Relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), ΔW = W − dequant(q).

    H = E[x xᵀ] of the linear's input ([in, in]); the identity when None, which gives
    ‖ΔW‖² / ‖W‖². This is e_l(b) as used by the budget allocator. Computed in float64.
    0.0 for an all-zero weight that is reproduced exactly.
    """
    if tuple(weight.shape) != tuple(q.shape):
        raise ValueError(f"weight shape {tuple(weight.shape)} != quantized shape {q.shape}")
    w = weight.detach().to(torch.float64)
    delta = w - dequantize_weight(q, torch.float64).to(w.device)
    if hessian is None:
        num = float(delta.square().sum())
        den = float(w.square().sum())
    else:
        in_features = q.shape[1]
        if tuple(hessian.shape) != (in_features, in_features):
            raise ValueError(f"hessian must be [{in_features}, {in_features}], got {tuple(hessian.shape)}")
        h = hessian.detach().to(device=w.device, dtype=torch.float64)
        num = float(((delta @ h) * delta).sum())
        den = float(((w @ h) * w).sum())
    if den <= 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
