"""Pieces shared by the scorers: inputs, streamed layer statistics, quantization errors,
z-scores and profile assembly.

Quantization error of a layer (`LayerProfile.quant_error[b]`): every linear of the layer is
quantized at `b` bits with the job's group size / symmetry / clip search, and its relative output
error on the calibration activations is measured as tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with
H = XᵀX / n of that linear's input (the quantity of `core.quant.primitives.quantization_error`,
evaluated in float32 by `relative_output_error` with tr(W H Wᵀ) computed once per linear). The layer's
value is the parameter-weighted mean of its linears' relative errors: each term is scale-free,
so a linear with a large output (down_proj) does not drown the others, and the weights make the
number the per-weight average the allocator trades against bits. 16 bits → 0. Each linear's own
error is kept too (`LayerProfile.linears`): per-linear allocation trades those.
Without calibration activations (the `uniform` method with no data) H is the identity
(relative weight error). With `quantizer: gptq` the weights are quantized by GPTQ on the same
Hessians, so the allocator trades the errors the job will actually have (GPTQ lowers the 4-bit
error far more than the 8-bit one, and by different amounts per layer).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from core.calibration import Batch, HessianCollector, StageProgress, default_batch_tokens, make_batches, pad_token_id
from core.data import subsample_rows, tokenize_rows
from core.errors import InvalidSpec
from core.models import LayerRef, LoadedModel
from core.spec import CalibrationRow, JobSpec
from core.types import LayerProfile, LinearProfile, Profile, QuantizedWeight

__all__ = [
    "LayerOutputStats",
    "LayerScores",
    "build_profile",
    "calibration_batches",
    "exp_sensitivity",
    "LayerQuantization",
    "layer_quant_errors",
    "output_energy",
    "lowest_bits",
    "prompt_sequences",
    "quant_error_profile",
    "quantize_layer",
    "quantized_layer",
    "relative_output_error",
    "select_rows",
    "zscore",
]


def lowest_bits(bit_choices: Sequence[int]) -> int:
    """The lowest allowed width below 16 (16 when only 16 is allowed)."""
    below = [b for b in bit_choices if b < 16]
    return min(below) if below else 16


def zscore(values: Sequence[float]) -> list[float]:
    """(x - mean) / std with the population std; all zeros when the values are constant."""
    if not values:
        return []
    x = torch.tensor(list(values), dtype=torch.float64)
    std = x.std(unbiased=False)
    if not torch.isfinite(std) or float(std) <= 1e-12 * max(1.0, float(x.abs().max())):
        return [0.0] * len(values)
    return [float(v) for v in (x - x.mean()) / std]


def exp_sensitivity(importance: Sequence[float]) -> list[float]:
    """exp(importance) normalised to mean 1: positive, monotone in importance, and one z-unit
    of importance multiplies the weight on quantization error by e."""
    if not importance:
        return []
    x = torch.tensor(list(importance), dtype=torch.float64)
    w = torch.exp(x - x.max())
    w = w / w.mean()
    return [float(v) for v in w]


def select_rows(rows: Sequence[CalibrationRow], spec: JobSpec) -> list[CalibrationRow]:
    """Rows beyond `spec.max_calibration_rows` are subsampled deterministically with the seed."""
    return subsample_rows(rows, spec.max_calibration_rows, spec.seed)


def calibration_batches(loaded: LoadedModel, sequences: Sequence[Sequence[int]],
                        batch_tokens: int | None = None) -> list[Batch]:
    device = loaded.device
    return make_batches(sequences, pad_token_id(loaded.tokenizer), device,
                        max_batch_tokens=batch_tokens or default_batch_tokens(device))


def prompt_sequences(loaded: LoadedModel, rows: Sequence[CalibrationRow], spec: JobSpec) -> list[list[int]]:
    return tokenize_rows(rows, loaded.tokenizer, spec.max_tokens)


class LayerOutputStats:
    """Streamed statistics of all activation elements at each layer output, over valid tokens:
    count, mean and M2 combined per batch with Chan et al.'s parallel update in float64, plus
    min and max."""

    def __init__(self, n_layers: int) -> None:
        self.count = [0] * n_layers
        self.mean = [0.0] * n_layers
        self.m2 = [0.0] * n_layers
        self.min = [math.inf] * n_layers
        self.max = [-math.inf] * n_layers

    def update(self, layer: int, values: torch.Tensor) -> None:
        x = values.detach().reshape(-1).to(torch.float64)
        nb = x.numel()
        if nb == 0:
            return
        mb = float(x.mean())
        m2b = float(((x - mb) ** 2).sum())
        na, ma = self.count[layer], self.mean[layer]
        n = na + nb
        delta = mb - ma
        self.mean[layer] = ma + delta * nb / n
        self.m2[layer] = self.m2[layer] + m2b + delta * delta * na * nb / n
        self.count[layer] = n
        self.min[layer] = min(self.min[layer], float(x.min()))
        self.max[layer] = max(self.max[layer], float(x.max()))

    def on_layer_output(self, layer: int, batch_index: int, hidden: torch.Tensor, batch: Batch) -> None:
        self.update(layer, hidden[batch.valid])

    def variance(self, layer: int) -> float:
        return self.m2[layer] / self.count[layer] if self.count[layer] else 0.0

    def value_range(self, layer: int) -> float:
        return self.max[layer] - self.min[layer] if self.count[layer] else 0.0


# ---------------------------------------------------------------------------------------------
# quantization of one layer
# ---------------------------------------------------------------------------------------------

def quantize_layer(ref: LayerRef, bits: int, spec: JobSpec) -> dict[str, QuantizedWeight]:
    """Every linear of the layer quantized at `bits` (empty for 16). Tensors stay on the
    model's device."""
    from core.quant.primitives import quantize_weight

    if bits >= 16:
        return {}
    return {name: quantize_weight(lin.weight.detach().float(), bits, spec.group_size, spec.symmetric,
                                  clip_search=spec.clip_search)
            for name, lin in ref.linears.items()}


@contextmanager
def quantized_layer(ref: LayerRef, bits: int, spec: JobSpec,
                    quantized: dict[str, QuantizedWeight] | None = None) -> Iterator[None]:
    """Temporarily replace the layer's linear weights by their dequantized `bits`-bit values
    (`quantized` reuses weights already quantized at those bits)."""
    from core.quant.primitives import dequantize_weight

    if bits >= 16:
        yield
        return
    if quantized is None:
        quantized = quantize_layer(ref, bits, spec)
    saved = {}
    try:
        with torch.no_grad():
            for name, q in quantized.items():
                weight = ref.linears[name].weight
                saved[name] = weight.detach().clone()
                weight.copy_(dequantize_weight(q, dtype=torch.float32).to(weight.device, weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                ref.linears[name].weight.copy_(original)


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None,
                          reference_energy: float | None = None) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), ΔW = W − approx, in float32 on the weight's device.

    The same quantity as `core.quant.primitives.quantization_error` (which works in float64 on
    a QuantizedWeight); this one takes the dequantized weight and an optional precomputed
    denominator so a scorer measuring several widths computes tr(W H Wᵀ) once. float32 keeps
    the relative error within ~1e-5 of the float64 value at a fraction of the cost.
    """
    w = weight.detach().to(torch.float32)
    delta = w - approx.detach().to(device=w.device, dtype=torch.float32)
    if hessian is None:
        num = float(delta.square().sum())
        den = float(w.square().sum()) if reference_energy is None else reference_energy
    else:
        h = hessian.to(device=w.device, dtype=torch.float32)
        num = float(((delta @ h) * delta).sum())
        den = float(((w @ h) * w).sum()) if reference_energy is None else reference_energy
    if den <= 0.0:
        return 0.0 if num == 0.0 else math.inf
    return max(0.0, num) / den


def output_energy(weight: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """tr(W H Wᵀ) (‖W‖² without H)."""
    w = weight.detach().to(torch.float32)
    if hessian is None:
        return float(w.square().sum())
    return float(((w @ hessian.to(device=w.device, dtype=torch.float32)) * w).sum())


def gptq_layer(linears: dict[str, torch.nn.Module], hessians: HessianCollector, bits: dict[str, int],
               spec: JobSpec) -> dict[str, QuantizedWeight]:
    """GPTQ of some of a layer's linears at their `bits`, one sweep per group of linears that
    share an input (one Hessian) and a width."""
    from core.quant.gptq import gptq_quantize_weights

    shared: dict[tuple[str, int], list[str]] = {}
    for name in linears:
        lead = hessians.leader.get(name)
        if lead is None or hessians.hessian(name) is None:
            raise InvalidSpec(f"no calibration activations reached {name}; cannot run GPTQ on it")
        shared.setdefault((lead, bits[name]), []).append(name)
    out: dict[str, QuantizedWeight] = {}
    for (lead, width), names in shared.items():
        out.update(gptq_quantize_weights({n: linears[n].weight.detach() for n in names},
                                         hessians.hessian(lead), width, spec.group_size, spec.symmetric,
                                         clip_search=spec.clip_search))
    return out


@dataclass(frozen=True)
class LayerQuantization:
    """quant_error per width for the layer and for each of its linears, plus the quantized
    weights at `keep_bits` when asked for (empty otherwise)."""

    errors: dict[int, float]
    linears: list[LinearProfile]
    kept: dict[str, QuantizedWeight] = field(default_factory=dict)


def layer_quant_errors(ref: LayerRef, hessians: HessianCollector | None, spec: JobSpec, *,
                       keep_bits: int | None = None) -> LayerQuantization:
    """quant_error[b] for every b in spec.bit_choices (see module docstring); the quantized
    weights at `keep_bits` are returned too (TAQO reuses them for its probe). The weights are
    quantized as the job will quantize them: with GPTQ when `spec.quantizer` is gptq (and
    Hessians are given), else round-to-nearest."""
    from core.quant.primitives import dequantize_weight, quantize_weight
    from core.spec import Quantizer

    errors: dict[int, float] = {}
    per_linear: dict[str, dict[int, float]] = {name: {} for name in ref.linears}
    kept: dict[str, QuantizedWeight] = {}
    weights = {name: lin.weight.detach().float() for name, lin in ref.linears.items()}
    total = sum(int(w.numel()) for w in weights.values())
    h = {name: (hessians.hessian(name) if hessians is not None else None) for name in weights}
    energy = {name: output_energy(w, h[name]) for name, w in weights.items()}
    widths = sorted(set(spec.bit_choices) | ({keep_bits} if keep_bits is not None and keep_bits < 16 else set()))
    for bits in widths:
        if bits >= 16 or total == 0:
            errors[bits] = 0.0
            for name in weights:
                per_linear[name][bits] = 0.0
            continue
        acc = 0.0
        gptq = (gptq_layer(ref.linears, hessians, {name: bits for name in weights}, spec)
                if spec.quantizer == Quantizer.gptq and hessians is not None else None)
        for name, w in weights.items():
            q = (gptq[name] if gptq is not None
                 else quantize_weight(w, bits, spec.group_size, spec.symmetric, clip_search=spec.clip_search))
            if bits == keep_bits:
                kept[name] = q
            err = relative_output_error(w, dequantize_weight(q, torch.float32), h[name], energy[name])
            per_linear[name][bits] = err
            acc += err * w.numel()
        errors[bits] = acc / total
    linears = [LinearProfile(name=name, params=int(w.numel()),
                             quant_error={b: per_linear[name][b] for b in spec.bit_choices})
               for name, w in weights.items()]
    return LayerQuantization(errors={b: errors[b] for b in spec.bit_choices}, linears=linears, kept=kept)


def quant_error_profile(loaded: LoadedModel, hessians: HessianCollector | None, spec: JobSpec,
                        tracker: StageProgress) -> list[LayerQuantization]:
    out = []
    n = len(loaded.layers)
    for ref in loaded.layers:
        tracker.check()
        out.append(layer_quant_errors(ref, hessians, spec))
        if hessians is not None:
            hessians.release(list(ref.linears))
        tracker.report((ref.index + 1) / n, f"quantization error of {ref.name} ({ref.index + 1}/{n})")
    return out


@dataclass(frozen=True)
class LayerScores:
    scores: dict[str, float]
    importance: float
    sensitivity: float


def build_profile(spec: JobSpec, loaded: LoadedModel, method: str, layer_scores: Sequence[LayerScores],
                  quant_errors: Sequence[LayerQuantization]) -> Profile:
    layers = []
    for ref, ls, qe in zip(loaded.layers, layer_scores, quant_errors, strict=True):
        layers.append(LayerProfile(index=ref.index, name=ref.name, params=ref.params,
                                   scores={k: float(v) for k, v in ls.scores.items()},
                                   importance=float(ls.importance), sensitivity=max(0.0, float(ls.sensitivity)),
                                   quant_error={int(b): float(e) for b, e in sorted(qe.errors.items())},
                                   linears=list(qe.linears)))
    return Profile(model=spec.model, method=method, layers=layers)
