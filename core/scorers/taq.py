"""TAQ (TAQ-IS): information and stability of each layer's output representations.

Statistics of the full-precision calibration stream, layer by layer in the layer pass:

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

import torch

from core.calibration import Batch
from core.scorers.common import LayerOutputStats, LayerScores, exp_sensitivity, zscore
from core.spec import JobSpec
from core.streaming.layer_pass import PassResult, StreamScorer, pass_layer_values
from core.streaming.model import StreamedModel

__all__ = ["ALPHA", "BETA", "TaqScorer", "TokenReservoir", "covariance_entropy", "matrix_entropy"]

ALPHA = 0.5  # weight of z(information)
BETA = 0.5  # weight of z(stability)


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
    """Uniform sample of `size` valid tokens over all batches (Algorithm R with a seeded CPU
    generator, drawn in batch order before the pass), the same tokens at every layer. `plan`
    holds, per batch, which reservoir slots take which of the batch's valid tokens (a later token
    replacing the same slot wins, as in sequential Algorithm R)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.seen = 0
        self.plan: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: global token index held in each slot (for tests and bookkeeping)
        self.slot_token = [-1] * size
        self.vectors: torch.Tensor | None = None  # [size, d] of the current layer

    @property
    def filled(self) -> int:
        return min(self.seen, self.size)

    def draw(self, batches: list[Batch]) -> None:
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.seen, self.plan, self.slot_token = 0, [], [-1] * self.size
        for batch in batches:
            n = batch.n_tokens
            g = torch.arange(self.seen, self.seen + n, dtype=torch.long)
            slot = torch.full((n,), -1, dtype=torch.long)
            early = g < self.size
            slot[early] = g[early]
            late = ~early
            n_late = int(late.sum())
            if n_late:
                u = torch.rand(n_late, generator=generator, dtype=torch.float64)
                j = torch.floor(u * (g[late] + 1).to(torch.float64)).to(torch.long)
                j[j >= self.size] = -1
                slot[late] = j
            last: dict[int, int] = {}
            for t, s in enumerate(slot.tolist()):
                if s >= 0:
                    last[s] = t
            slots = sorted(last)
            for s in slots:
                self.slot_token[s] = self.seen + last[s]
            self.plan.append(
                (torch.tensor(slots, dtype=torch.long), torch.tensor([last[s] for s in slots], dtype=torch.long))
            )
            self.seen += n

    def observe(self, batch_index: int, output: torch.Tensor, batch: Batch) -> None:
        slots, tokens = self.plan[batch_index]
        if slots.numel() == 0:
            return
        vectors = output[batch.valid.to(output.device)]  # [n_valid, d], row-major over (sequence, position)
        if self.vectors is None:
            self.vectors = torch.zeros(self.size, vectors.shape[-1], dtype=torch.float32, device=vectors.device)
        self.vectors[slots.to(vectors.device)] = vectors[tokens.to(vectors.device)].detach().to(torch.float32)

    def sample(self) -> torch.Tensor:
        if self.vectors is None:
            return torch.zeros(0, 0)
        return self.vectors[: self.filled]

    def reset(self) -> None:
        self.vectors = None


class TaqScorer(StreamScorer):
    method = "taq"

    def __init__(self, spec: JobSpec) -> None:
        self.reservoir = TokenReservoir(spec.reservoir_size, spec.seed)
        self.stats = LayerOutputStats()

    def begin(self, batches: list[Batch], n_layers: int) -> None:
        self.reservoir.draw(batches)

    def observe(self, layer: int, batch_index: int, output: torch.Tensor, batch: Batch) -> None:
        self.stats.observe(output, batch)
        self.reservoir.observe(batch_index, output, batch)

    def layer_values(self, layer: int) -> dict[str, float]:
        values = {
            "information": matrix_entropy(self.reservoir.sample()),
            "variance": self.stats.variance,
            "reservoir_tokens": float(self.reservoir.filled),
        }
        self.stats.reset()
        self.reservoir.reset()
        return values

    def finish(self, model: StreamedModel, result: PassResult) -> list[LayerScores]:
        info = pass_layer_values(result.records, "information")
        variance = pass_layer_values(result.records, "variance")
        filled = pass_layer_values(result.records, "reservoir_tokens")
        stab = [-v for v in variance]
        z_info, z_stab = zscore(info), zscore(stab)
        importance = [ALPHA * a + BETA * b for a, b in zip(z_info, z_stab)]
        sensitivity = exp_sensitivity(importance)
        return [
            LayerScores(
                scores={
                    "information": info[l],
                    "effective_rank": math.exp(info[l]),
                    "stability": stab[l],
                    "variance": variance[l],
                    "z_information": z_info[l],
                    "z_stability": z_stab[l],
                    "reservoir_tokens": filled[l],
                },
                importance=importance[l],
                sensitivity=sensitivity[l],
            )
            for l in range(len(result.records))
        ]
