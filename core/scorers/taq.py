"""TAQ (TAQ-IS): information and stability of each layer's output representations.

One forward pass over the calibration prompts:

* information = matrix entropy H = -Σ p_i log p_i of the normalised eigen-spectrum
  p = λ / Σλ of the centred Gram matrix Xc Xcᵀ (r × r) of a reservoir of r token hidden vectors
  at the layer output. The Gram matrix has the same non-zero spectrum as the centred covariance
  XcᵀXc (d × d), so the d × d eigendecomposition is never needed. The reservoir holds
  `spec.reservoir_size` tokens drawn uniformly from all valid (non-padding) tokens of all prompts
  by reservoir sampling (Algorithm R) in a single pass with a seeded `torch.Generator`; the same
  tokens are used at every layer.
* stability = − variance of all activation elements at the layer output (valid tokens), streamed
  in float64 with Chan's parallel update.
* importance = 0.5 · z(information) + 0.5 · z(stability) (z over layers, population std).
* sensitivity = exp(importance) normalised to mean 1 (positive, monotone; one z-unit of
  importance multiplies the weight the allocator puts on that layer's quantization error by e).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from core.calibration import Batch, HessianCollector, StageProgress, run_fp_pass
from core.models import LoadedModel
from core.scorers.common import (LayerOutputStats, LayerScores, build_profile, calibration_batches,
                                 exp_sensitivity, prompt_sequences, quant_error_profile, select_rows, zscore)
from core.spec import CalibrationRow, JobSpec
from core.types import CancelFn, Profile, ProgressFn, never_cancel, no_progress

__all__ = ["ALPHA", "BETA", "TokenReservoir", "covariance_entropy", "matrix_entropy", "score_taq"]

ALPHA = 0.5  # weight of z(information)
BETA = 0.5   # weight of z(stability)


def _entropy_of_spectrum(eigenvalues: torch.Tensor) -> float:
    lam = eigenvalues.to(torch.float64).clamp_min(0.0)
    total = lam.sum()
    if not torch.isfinite(total) or float(total) <= 0.0:
        return 0.0
    p = lam / total
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def matrix_entropy(vectors: torch.Tensor) -> float:
    """Entropy of the normalised spectrum of the centred Gram matrix of `vectors` [r, d]."""
    x = vectors.detach().to(device="cpu", dtype=torch.float64)
    if x.shape[0] < 2:
        return 0.0
    xc = x - x.mean(dim=0, keepdim=True)
    gram = xc @ xc.T
    return _entropy_of_spectrum(torch.linalg.eigvalsh(gram))


def covariance_entropy(vectors: torch.Tensor) -> float:
    """The same quantity through the d × d centred covariance (reference for tests only)."""
    x = vectors.detach().to(device="cpu", dtype=torch.float64)
    xc = x - x.mean(dim=0, keepdim=True)
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    return _entropy_of_spectrum(torch.linalg.eigvalsh(cov))


class TokenReservoir:
    """Uniform sample of `size` valid tokens over the whole pass (Algorithm R), one slot plan per
    batch shared by all layers; vectors are stored per layer."""

    def __init__(self, n_layers: int, size: int, seed: int) -> None:
        self.n_layers = n_layers
        self.size = size
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.seen = 0
        self.vectors: torch.Tensor | None = None  # [L, size, d] float32
        self._slots = torch.empty(0, dtype=torch.long)
        self._tokens = torch.empty(0, dtype=torch.long)
        #: global token index held in each slot (for tests and bookkeeping)
        self.slot_token = [-1] * size

    @property
    def filled(self) -> int:
        return min(self.seen, self.size)

    def before_batch(self, batch_index: int, batch: Batch) -> None:
        n = batch.n_tokens
        g = torch.arange(self.seen, self.seen + n, dtype=torch.long)
        slot = torch.full((n,), -1, dtype=torch.long)
        early = g < self.size
        slot[early] = g[early]
        late = ~early
        n_late = int(late.sum())
        if n_late:
            u = torch.rand(n_late, generator=self.generator, dtype=torch.float64)
            j = torch.floor(u * (g[late] + 1).to(torch.float64)).to(torch.long)
            j[j >= self.size] = -1
            slot[late] = j
        last: dict[int, int] = {}
        for t, s in enumerate(slot.tolist()):
            if s >= 0:
                last[s] = t  # a later token replacing the same slot wins, as in sequential Algorithm R
        self._slots = torch.tensor(sorted(last), dtype=torch.long)
        self._tokens = torch.tensor([last[s] for s in sorted(last)], dtype=torch.long)
        for s in sorted(last):
            self.slot_token[s] = self.seen + last[s]
        self.seen += n

    def on_layer_output(self, layer: int, batch_index: int, hidden: torch.Tensor, batch: Batch) -> None:
        if self._slots.numel() == 0:
            return
        vectors = hidden[batch.valid]  # [n_valid, d], row-major over (sequence, position)
        if self.vectors is None:
            self.vectors = torch.zeros(self.n_layers, self.size, vectors.shape[-1], dtype=torch.float32,
                                       device=vectors.device)
        self.vectors[layer, self._slots.to(vectors.device)] = \
            vectors[self._tokens.to(vectors.device)].detach().to(torch.float32)

    def sample(self, layer: int) -> torch.Tensor:
        if self.vectors is None:
            return torch.zeros(0, 0)
        return self.vectors[layer, : self.filled]


def score_taq(loaded: LoadedModel, rows: Sequence[CalibrationRow], spec: JobSpec,
              progress: ProgressFn = no_progress, should_cancel: CancelFn = never_cancel, *,
              batch_tokens: int | None = None) -> Profile:
    tracker = StageProgress(progress, should_cancel, "score")
    rows = select_rows(rows, spec)
    n_layers = len(loaded.layers)
    batches = calibration_batches(loaded, prompt_sequences(loaded, rows, spec), batch_tokens)
    stats = LayerOutputStats(n_layers)
    reservoir = TokenReservoir(n_layers, spec.reservoir_size, spec.seed)
    hessians = HessianCollector(loaded)
    run_fp_pass(loaded, batches, observers=(stats, reservoir), hessians=hessians,
                before_batch=reservoir.before_batch, tracker=tracker.span(0.0, 0.6))

    info, stab = [], []
    entropy_tracker = tracker.span(0.6, 0.7)
    for layer in range(n_layers):
        entropy_tracker.check()
        info.append(matrix_entropy(reservoir.sample(layer)))
        stab.append(-stats.variance(layer))
        entropy_tracker.report((layer + 1) / n_layers, f"information of layer {layer + 1}/{n_layers}")
    z_info, z_stab = zscore(info), zscore(stab)
    importance = [ALPHA * a + BETA * b for a, b in zip(z_info, z_stab)]
    sensitivity = exp_sensitivity(importance)
    layer_scores = [
        LayerScores(scores={"information": info[l], "effective_rank": math.exp(info[l]),
                            "stability": stab[l], "variance": -stab[l],
                            "z_information": z_info[l], "z_stability": z_stab[l],
                            "reservoir_tokens": float(reservoir.filled)},
                    importance=importance[l], sensitivity=sensitivity[l])
        for l in range(n_layers)]
    quant_errors = quant_error_profile(loaded, hessians, spec, tracker.span(0.7, 1.0))
    return build_profile(spec, loaded, "taq", layer_scores, quant_errors)
