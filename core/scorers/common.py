"""Pieces shared by the scorers: rows and sequences, streamed statistics, z-scores, and profile
assembly from the layer pass's records.

Quantization error of a layer (`LayerProfile.quant_error[b]`): every linear of the layer is
quantized at `b` bits by the layer pass with the job's quantizer, group size, symmetry and clip
search, and its relative output error on the calibration activations is measured
(`core.quant.layer`: ‖(W − Ŵ)Xᵀ‖² / ‖WXᵀ‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)). The layer's value is the
parameter-weighted mean of its linears' relative errors: each term is scale-free, so a linear with
a large output (down_proj) does not drown the others, and the weights make the number the
per-weight average the allocator trades against bits. 16 bits → 0. Each linear's own error is kept
too (`LayerProfile.linears`): per-linear allocation trades those. Without calibration activations
(the `uniform` method with no data) it is the relative weight error. With `quantizer: gptq` the
errors are GPTQ's own, so the allocator trades the errors the job will actually have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from core.calibration import Batch
from core.data import subsample_rows, tokenize_rows
from core.spec import CalibrationRow, JobSpec
from core.streaming.checkpoints import LayerRecord
from core.types import LayerProfile, LinearProfile, Profile

__all__ = [
    "LayerOutputStats",
    "LayerScores",
    "SequencePlan",
    "build_profile",
    "damage_scaled",
    "floored_damages",
    "record_error",
    "exp_sensitivity",
    "lowest_bits",
    "prompt_plan",
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


@dataclass(frozen=True)
class SequencePlan:
    """The token sequences the layer pass runs (one or more per row). `starts[i]` is where
    sequence i's scored answer begins (None: no answer); `row_of[i]` its row."""

    sequences: list[list[int]]
    row_of: list[int]
    starts: list[int | None]
    n_rows: int


def prompt_plan(tokenizer: Any, rows: Sequence[CalibrationRow], spec: JobSpec) -> SequencePlan:
    """One sequence per row: the rendered prompt (chat template), truncated keeping its end."""
    sequences = tokenize_rows(rows, tokenizer, spec.max_tokens)
    starts: list[int | None] = [None] * len(rows)
    return SequencePlan(sequences=sequences, row_of=list(range(len(rows))), starts=starts, n_rows=len(rows))


class LayerOutputStats:
    """Streamed statistics of all activation elements of one layer's output over valid tokens:
    count, mean and M2 combined per batch with Chan et al.'s parallel update in float64, plus
    min and max. `reset()` starts the next layer."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf

    def update(self, values: torch.Tensor) -> None:
        x = values.detach().reshape(-1).to(torch.float64)
        nb = x.numel()
        if nb == 0:
            return
        mb = float(x.mean())
        m2b = float(((x - mb) ** 2).sum())
        na, ma = self.count, self.mean
        n = na + nb
        delta = mb - ma
        self.mean = ma + delta * nb / n
        self.m2 = self.m2 + m2b + delta * delta * na * nb / n
        self.count = n
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))

    def observe(self, output: torch.Tensor, batch: Batch) -> None:
        self.update(output[batch.valid.to(output.device)])

    @property
    def variance(self) -> float:
        return self.m2 / self.count if self.count else 0.0

    @property
    def value_range(self) -> float:
        return self.max - self.min if self.count else 0.0


def record_error(record: LayerRecord, bits: int) -> float:
    """A layer's relative error at `bits` from its pass record: the parameter-weighted mean of its
    linears' (the profile's `LayerProfile.quant_error[bits]`); 0 for an empty layer."""
    total = sum(record.params.values())
    return sum(p * float(record.errors[n][bits]) for n, p in record.params.items()) / total if total else 0.0


def floored_damages(drops: Sequence[float]) -> list[float]:
    """Per layer, a damage-style sensitivity from its measured drop: max(drop, 0) + floor, the floor
    1 % of the mean positive drop (1e-6 when none is positive), so no layer is free to quantize and
    ties are resolved by the measured error."""
    positive = [max(0.0, d) for d in drops]
    mean_pos = sum(positive) / len(positive) if positive else 0.0
    floor = 0.01 * mean_pos if mean_pos > 0 else 1e-6
    return [p + floor for p in positive]


def damage_scaled(
    damage: float, record: LayerRecord, probe_bits: int, widths: Sequence[int]
) -> dict[str, dict[int, float]]:
    """A damage-style sensitivity (the task damage measured with the layer at `probe_bits`, as
    taqo's Δ NLL or taq_kl's KL) as a predicted loss per linear and width, without counting the
    error twice: the layer's damage at width b is damage · e_l(b) / e_l(probe), shared among its
    linears in proportion to n_j·e_j(b). At the probe width the prediction is the damage itself."""
    total = sum(record.params.values())
    if probe_bits >= 16 or total == 0:
        return {}
    probe_error = record_error(record, probe_bits)
    if probe_error <= 0:
        return {n: dict.fromkeys(widths, 0.0) for n in record.params}
    scale = damage / (probe_error * total)
    return {n: {b: scale * record.params[n] * float(record.errors[n][b]) for b in widths} for n in record.params}


@dataclass(frozen=True)
class LayerScores:
    scores: dict[str, float]
    importance: float
    sensitivity: float
    #: per linear, per width: the method's predicted task-loss increase (methods that predict it:
    #: the allocator then minimises its sum instead of sensitivity × error)
    predicted_loss: dict[str, dict[int, float]] = field(default_factory=dict)


def build_profile(
    spec: JobSpec, method: str, layer_scores: Sequence[LayerScores], records: Sequence[LayerRecord]
) -> Profile:
    """The profile from the method's per-layer scores and the pass's per-layer records."""
    layers = []
    choices = sorted(spec.bit_choices)
    for ls, record in zip(layer_scores, records, strict=True):
        total = sum(record.params.values())
        linears = [
            LinearProfile(
                name=name,
                params=params,
                quant_error={b: float(record.errors[name][b]) for b in choices},
                in_features=record.in_features.get(name),
                predicted_loss={b: float(v) for b, v in ls.predicted_loss.get(name, {}).items()},
            )
            for name, params in record.params.items()
        ]
        quant_error = {b: record_error(record, b) for b in choices}
        predicted = (
            {b: sum(l.predicted_loss[b] for l in linears) for b in linears[0].predicted_loss}
            if linears and all(l.predicted_loss for l in linears)
            else {}
        )
        layers.append(
            LayerProfile(
                index=record.index,
                name=record.name,
                params=total,
                scores={k: float(v) for k, v in ls.scores.items()},
                importance=float(ls.importance),
                sensitivity=max(0.0, float(ls.sensitivity)),
                quant_error=quant_error,
                linears=linears,
                predicted_loss=predicted,
            )
        )
    return Profile(model=spec.model, method=method, layers=layers)
