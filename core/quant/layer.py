"""One decoder layer quantized at every width the job may choose, with the measured error of each.

`LayerInputs` records what the layer's linears receive over the valid (non-padding) calibration
tokens while the layer runs: linears fed the very same tensor (q/k/v, gate/up) share one record.
A record keeps the raw rows X when there are fewer tokens than input features, else accumulates
XᵀX; either way it gives H = XᵀX / n for GPTQ and the relative output error

    e = ‖(W − Ŵ) Xᵀ‖² / ‖W Xᵀ‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)

at the lower cost (an 8B down_proj with 1,024 calibration tokens: X is 59 MB and the error costs
0.12 TFLOP, where H would be 822 MB and 1.7 TFLOP). Without calibration data H is the identity
(relative weight error).

`quantize_layer` quantizes every linear at every width below 16 with round-to-nearest or GPTQ
(one inverse-Hessian factor per shared input; the widths on one group size in one sweep where that
does not raise the layer's GPTQ memory peak, i.e. for the smaller groups) and measures e per linear
and width: with recorded rows as ‖X Ŵᵀ − X Wᵀ‖², Ŵ taken from the sweep's working copy right
after the sweep (no dequantization, no [out, in] difference: two matrix products). The layer's
error at a width is the parameter-weighted mean over its linears (see core/scorers/common.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.errors import InvalidSpec
from core.memory import FLOAT64_FACTOR_MAX_FEATURES, gptq_group_bytes
from core.scheme import QuantScheme
from core.types import QuantizedWeight

__all__ = ["FLOAT64_FACTOR_MAX_FEATURES", "LayerInputs", "LayerQuantization", "quantize_layer"]

# above FLOAT64_FACTOR_MAX_FEATURES input features GPTQ factors H in float32 (a float64 [in, in]
# matrix of an 8B down_proj is 1.6 GB, and two are alive during the factorisation); one constant
# with the preflight, which prices the factor by it


class LayerInputs:
    """Inputs of one layer's linears (see the module docstring). Use `recording()` around the
    layer's forward and `set_batch(valid)` before each batch."""

    def __init__(self, linears: dict[str, nn.Linear], n_tokens: int) -> None:
        self.linears = linears
        self.n_tokens = int(n_tokens)
        self.leader: dict[str, str] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}
        self._valid: torch.Tensor | None = None

    def set_batch(self, valid: torch.Tensor | None) -> None:
        self._valid = valid
        self._seen = {}

    def _valid_rows(self, x: torch.Tensor) -> torch.Tensor:
        valid = self._valid
        if valid is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(valid.shape):
            return x[valid.to(x.device)]
        return x.reshape(-1, x.shape[-1])

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[1] is x:
                self.leader[name] = seen[0]
                return
            self._seen[id(x)] = (name, x)
            self.leader[name] = name
            rows = self._valid_rows(x).to(torch.float32)
            self.counts[name] = self.counts.get(name, 0) + int(rows.shape[0])
            if self.n_tokens < rows.shape[1]:
                self.rows.setdefault(name, []).append(rows.detach().clone())
            else:
                xtx = rows.T @ rows
                if name in self.sums:
                    self.sums[name] += xtx
                else:
                    self.sums[name] = xtx

        return pre_hook

    @contextmanager
    def recording(self) -> Iterator[None]:
        handles = [linear.register_forward_pre_hook(self._hook(name)) for name, linear in self.linears.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._seen = {}

    # ---- what the records give ----------------------------------------------------------------
    def _lead(self, name: str) -> str | None:
        lead = self.leader.get(name)
        return lead if lead is not None and self.counts.get(lead, 0) > 0 else None

    def has_data(self, name: str) -> bool:
        return self._lead(name) is not None

    def x(self, name: str) -> torch.Tensor | None:
        lead = self._lead(name)
        if lead is None or lead not in self.rows:
            return None
        parts = self.rows[lead]
        if len(parts) > 1:
            self.rows[lead] = parts = [torch.cat(parts)]
        return parts[0]

    def hessian(self, name: str) -> torch.Tensor | None:
        """H = XᵀX / n (float32) of the linear's input, a new matrix each call (one [in, in] matrix:
        XᵀX is scaled in place), None without calibration data."""
        lead = self._lead(name)
        if lead is None:
            return None
        x = self.x(lead)
        if x is None:
            return self.sums[lead] / self.counts[lead]  # the sums stay for the error measurement
        return (x.T @ x).div_(self.counts[lead])

    def groups(self) -> dict[str, list[str]]:
        """Linears by the record (leader) of their input."""
        out: dict[str, list[str]] = {}
        for name in self.linears:
            out.setdefault(self.leader.get(name, name), []).append(name)
        return out

    def energy(self, name: str, weight: torch.Tensor) -> float:
        """‖W Xᵀ‖² (or tr(W H Wᵀ)·n; ‖W‖² without data): the denominator of the relative error."""
        return self._quadratic(name, weight.to(torch.float32))

    def relative_error(self, name: str, weight: torch.Tensor, approx: torch.Tensor, energy: float) -> float:
        num = self._quadratic(name, weight.to(torch.float32) - approx.to(device=weight.device, dtype=torch.float32))
        return _ratio(num, energy)

    def outputs(self, name: str, weight: torch.Tensor) -> torch.Tensor | None:
        """X Wᵀ [tokens, out] (float32) over the recorded rows for a [out, in] weight in any
        layout, or None when the record holds XᵀX instead of rows, or there is no data."""
        lead = self._lead(name)
        x = self.x(lead) if lead is not None else None
        if x is None:
            return None
        return x.to(weight.device) @ weight.to(torch.float32).T

    def _quadratic(self, name: str, delta: torch.Tensor) -> float:
        lead = self._lead(name)
        if lead is None:
            return float(delta.square().sum())
        x = self.x(lead)
        if x is not None:
            return float((x.to(delta.device) @ delta.T).square().sum())
        h = self.sums[lead].to(delta.device)
        return float(((delta @ h) * delta).sum())

    def clear(self) -> None:
        self.rows.clear()
        self.sums.clear()


def _ratio(num: float, energy: float) -> float:
    if energy <= 0.0:
        return 0.0 if num == 0.0 else math.inf
    return max(0.0, num) / energy


class _ErrorMeter:
    """Each linear's relative output error per width. With recorded rows X it compares outputs,
    e = ‖X Ŵᵀ − X Wᵀ‖² / ‖X Wᵀ‖², two matrix products and no [out, in] difference (the rounding of
    the two products is correlated: the result agrees with ‖X ΔWᵀ‖² computed in float64 to ~1e-7).
    Reference outputs X Wᵀ are kept until `done(keep=...)` says otherwise. With XᵀX (or no data)
    it forms ΔW = W − Ŵ."""

    def __init__(self, inputs: LayerInputs | None, weights: dict[str, torch.Tensor]) -> None:
        self.inputs, self.weights = inputs, weights
        self.errors: dict[str, dict[int, float]] = {name: {} for name in weights}
        self.energies: dict[str, float] = {}
        self._references: dict[str, torch.Tensor | None] = {}

    def _outputs(self, name: str) -> torch.Tensor | None:
        if name not in self._references:
            w = self.weights[name]
            y = self.inputs.outputs(name, w) if self.inputs is not None else None
            self._references[name] = y
            if name not in self.energies:
                if y is not None:
                    self.energies[name] = float(y.square().sum())
                elif self.inputs is not None:
                    self.energies[name] = self.inputs.energy(name, w)
                else:
                    self.energies[name] = float(w.to(torch.float32).square().sum())
        return self._references[name]

    def measure(self, name: str, bits: int, approx: torch.Tensor) -> None:
        """Record the error of `approx` (Ŵ [out, in], any layout) as `name`'s at `bits`."""
        y = self._outputs(name)
        energy = self.energies[name]
        if y is not None:
            assert self.inputs is not None  # outputs exist only with recorded rows
            y_hat = self.inputs.outputs(name, approx)
            assert y_hat is not None
            self.errors[name][bits] = _ratio(float(y_hat.sub_(y).square_().sum()), energy)
        elif self.inputs is not None:
            self.errors[name][bits] = self.inputs.relative_error(name, self.weights[name], approx, energy)
        else:
            w = self.weights[name].to(torch.float32)
            delta = w - approx.to(device=w.device, dtype=torch.float32)
            self.errors[name][bits] = _ratio(float(delta.square().sum()), energy)

    def done(self, keep: bool = False) -> None:
        """The measurements of one sweep (or of all RTN widths) are done; `keep` the reference
        outputs for the next sweep of the same linears."""
        if not keep:
            self._references.clear()


def _sweeps(low: list[int], scheme: QuantScheme, shape: tuple[int, int], peak: int) -> list[list[int]]:
    """The sweeps of one group [in, out]: widths on the same group size share one (see
    gptq_quantize_widths) where that stays within the layer's one-width GPTQ `peak`."""
    by_group_size: dict[int, list[int]] = {}
    for bits in low:
        by_group_size.setdefault(scheme.group_size_at(bits), []).append(bits)
    return [
        sweep
        for same in by_group_size.values()
        for sweep in ([same] if gptq_group_bytes(*shape, widths=len(same)) <= peak else [[b] for b in same])
    ]


@dataclass(frozen=True)
class LayerQuantization:
    """Every linear of a layer at every width: `codes[width][linear]` and `errors[linear][width]`
    (relative output error; 16 bits → 0)."""

    codes: dict[int, dict[str, QuantizedWeight]]
    errors: dict[str, dict[int, float]]


def quantize_layer(
    weights: dict[str, torch.Tensor],
    inputs: LayerInputs | None,
    widths: list[int],
    *,
    scheme: QuantScheme,
    gptq: bool,
    clip_search: bool,
) -> LayerQuantization:
    """Quantize each [out, in] weight at every width in `widths` (16 is kept, error 0) on `scheme`
    (each width at its own group size) with round-to-nearest or GPTQ, and measure each result's
    relative output error."""
    from core.quant.gptq import gptq_quantize_widths, inverse_hessian_factor
    from core.quant.primitives import dequantize_weight, quantize_weight

    low = sorted(b for b in set(widths) if b < 16)
    codes: dict[int, dict[str, QuantizedWeight]] = {b: {} for b in low}
    meter = _ErrorMeter(inputs, weights)
    if gptq:
        if inputs is None:
            raise InvalidSpec("quantizer 'gptq' needs calibration activations")
        groups = inputs.groups()
        shapes = {
            lead: (int(weights[names[0]].shape[1]), sum(int(weights[n].shape[0]) for n in names))
            for lead, names in groups.items()
        }
        # the layer's GPTQ peak with one width per sweep (what core.memory's preflight counts):
        # a group's widths are swept together only where that stays within it
        peak = max(gptq_group_bytes(n, out) for n, out in shapes.values())
        for lead, names in groups.items():
            if not inputs.has_data(lead):
                raise InvalidSpec(f"no calibration activations reached {names[0]}; cannot run GPTQ on it")
            dtype = torch.float64 if shapes[lead][0] <= FLOAT64_FACTOR_MAX_FEATURES else torch.float32

            # H is built inside the factorisation, which works in place: one [in, in] matrix is
            # alive from H to the factor (core.memory counts it so)
            def hessian(_lead: str = lead) -> torch.Tensor:
                h = inputs.hessian(_lead)
                assert h is not None  # has_data() was checked above
                return h

            upper = inverse_hessian_factor(hessian, dtype=dtype)
            sweeps = _sweeps(low, scheme, shapes[lead], peak)
            # the group's reference outputs X Wᵀ stay from one of its sweeps to the next where that
            # stays within the peak (else each sweep computes them again)
            keep = gptq_group_bytes(*shapes[lead]) + 4 * inputs.n_tokens * shapes[lead][1] <= peak
            for k, sweep_widths in enumerate(sweeps):
                swept = gptq_quantize_widths(
                    {n: weights[n] for n in names},
                    None,
                    sweep_widths,
                    scheme.group_size_at(sweep_widths[0]),
                    scheme.symmetric,
                    clip_search=clip_search,
                    upper=upper,
                    float_zero=scheme.float_zero,
                    k_quants=scheme.k_quants,
                )
                for bits, quantized in swept.codes.items():
                    codes[bits].update(quantized)
                # measured while the sweep's working copy holds Ŵ, within the sweep's memory
                for name in names:
                    for bits in sweep_widths:
                        meter.measure(name, bits, swept.dequantized(bits, name))
                meter.done(keep=keep and k + 1 < len(sweeps))
                del swept
            del upper
    else:
        for name, weight in weights.items():
            for bits in low:
                codes[bits][name] = quantize_weight(
                    weight,
                    bits,
                    scheme.group_size_at(bits),
                    scheme.symmetric,
                    clip_search=clip_search,
                    float_zero=scheme.float_zero,
                    k_quants=scheme.k_quants,
                )
                meter.measure(name, bits, dequantize_weight(codes[bits][name], torch.float32))
        meter.done()
    errors = {name: {b: 0.0 if b >= 16 else meter.errors[name][b] for b in sorted(set(widths))} for name in weights}
    return LayerQuantization(codes=codes, errors=errors)
