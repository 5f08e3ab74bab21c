"""TAQ (TAQ-IS): information and stability of each layer's output representations, measured on
the task's own tokens.

Which tokens count ("task tokens"): valid (non-padding) tokens after the prefix every calibration
sequence shares (chat template, system prompt, a fixed instruction: the same tokens for every
row say nothing about the task), and, per layer and batch, not a massive-activation token (an
output norm above MASSIVE_RATIO × the batch's median task-token norm: the attention sink and its
kind reach ≈24,900 on SmolLM2's layers 11–27 against ≤ 673 for the rest and would set both
statistics alone). When the shared prefix covers every token (identical rows), every valid token
counts.

Statistics of the full-precision calibration stream, layer by layer in the layer pass:

* information = matrix entropy H = -Σ p_i log p_i of the normalised eigen-spectrum
  p = λ / Σλ of the centred Gram matrix Xc Xcᵀ (r × r) of a reservoir of r token hidden vectors
  at the layer output. The Gram matrix has the same non-zero spectrum as the centred covariance
  XcᵀXc (d × d), so the d × d eigendecomposition is never needed. The reservoir holds
  `spec.reservoir_size` tokens drawn uniformly from the task tokens (massive ones aside) by
  reservoir sampling (Algorithm R) in a single pass with a seeded `torch.Generator`; the same
  tokens are used at every layer, except those massive at that layer.
* stability = − variance of all elements of the layer's own update (output − input) over the
  layer's task tokens, streamed in float64 with Chan's parallel update. (The paper takes the
  variance of the output, i.e. of the residual stream, which grows with depth and is dominated by
  the sink: a statement about the model, not the task. The update is what the layer contributes.)
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

__all__ = [
    "ALPHA",
    "BETA",
    "MASSIVE_RATIO",
    "TaqScorer",
    "TokenReservoir",
    "covariance_entropy",
    "massive_tokens",
    "matrix_entropy",
    "shared_prefix",
]

ALPHA = 0.5  # weight of z(information)
BETA = 0.5  # weight of z(stability)
#: a token whose output norm exceeds this multiple of the batch's median task-token norm is a
#: massive activation (attention sink), left out of the layer's statistics
MASSIVE_RATIO = 20.0


def shared_prefix(batches: list[Batch]) -> int:
    """Length of the token prefix every valid sequence of every batch starts with."""
    sequences = [
        batch.input_ids[r, : int(batch.attention_mask[r].sum())].tolist()
        for batch in batches
        for r in range(batch.input_ids.shape[0])
    ]
    if not sequences:
        return 0
    first, length = sequences[0], min(len(s) for s in sequences)
    for i in range(length):
        if any(s[i] != first[i] for s in sequences):
            return i
    return length


def task_mask(batch: Batch, prefix: int) -> torch.Tensor:
    """Valid positions at or after `prefix` [B, T] (all valid positions when none would remain)."""
    mask = batch.valid.clone()
    mask[:, :prefix] = False
    return mask


def massive_tokens(norms: torch.Tensor) -> torch.Tensor:
    """Which of these token norms [N] are massive activations (> MASSIVE_RATIO × their median)."""
    if norms.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=norms.device)
    return norms > MASSIVE_RATIO * norms.median()


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
    """Uniform sample of `size` tokens over all batches (Algorithm R with a seeded CPU generator,
    drawn in batch order before the pass), the same tokens at every layer. The tokens are each
    batch's valid ones, or those of `masks` when given. `plan` holds, per batch, which reservoir
    slots take which of the batch's tokens (a later token replacing the same slot wins, as in
    sequential Algorithm R). `observe` may leave tokens out of one layer's sample (`drop`)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.seen = 0
        self.plan: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.masks: list[torch.Tensor] | None = None
        #: global token index held in each slot (for tests and bookkeeping)
        self.slot_token = [-1] * size
        self.vectors: torch.Tensor | None = None  # [size, d] of the current layer
        self.kept = torch.ones(size, dtype=torch.bool)  # slots in the current layer's sample

    @property
    def filled(self) -> int:
        return min(self.seen, self.size)

    def _mask(self, batch_index: int, batch: Batch) -> torch.Tensor:
        return batch.valid if self.masks is None else self.masks[batch_index]

    def draw(self, batches: list[Batch], masks: list[torch.Tensor] | None = None) -> None:
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.masks = masks
        self.seen, self.plan, self.slot_token = 0, [], [-1] * self.size
        for b, batch in enumerate(batches):
            n = int(self._mask(b, batch).sum())
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

    def observe(self, batch_index: int, output: torch.Tensor, batch: Batch, drop: torch.Tensor | None = None) -> None:
        """Store the sampled tokens' vectors of one batch; `drop` [tokens of the batch's mask]
        marks tokens left out of this layer's sample."""
        slots, tokens = self.plan[batch_index]
        if slots.numel() == 0:
            return
        # [n, d], row-major over (sequence, position)
        vectors = output[self._mask(batch_index, batch).to(output.device)]
        if self.vectors is None:
            self.vectors = torch.zeros(self.size, vectors.shape[-1], dtype=torch.float32, device=vectors.device)
        self.vectors[slots.to(vectors.device)] = vectors[tokens.to(vectors.device)].detach().to(torch.float32)
        if drop is not None:
            self.kept[slots] = ~drop.cpu()[tokens]

    def sample(self) -> torch.Tensor:
        if self.vectors is None:
            return torch.zeros(0, 0)
        filled = self.filled
        return self.vectors[:filled][self.kept[:filled].to(self.vectors.device)]

    def reset(self) -> None:
        self.vectors = None
        self.kept = torch.ones(self.size, dtype=torch.bool)


class TaqScorer(StreamScorer):
    method = "taq"

    def __init__(self, spec: JobSpec) -> None:
        self.reservoir = TokenReservoir(spec.reservoir_size, spec.seed)
        self.stats = LayerOutputStats()
        self.masks: list[torch.Tensor] = []
        self.prefix = 0
        self.massive = 0

    def begin(self, batches: list[Batch], n_layers: int) -> None:
        self.prefix = shared_prefix(batches)
        self.masks = [task_mask(batch, self.prefix) for batch in batches]
        if not any(bool(m.any()) for m in self.masks):  # identical rows: every valid token counts
            self.prefix = 0
            self.masks = [batch.valid.clone() for batch in batches]
        self.reservoir.draw(batches, self.masks)

    def observe(self, layer: int, batch_index: int, output: torch.Tensor, batch: Batch, inputs: torch.Tensor) -> None:
        mask = self.masks[batch_index].to(output.device)
        tokens = output[mask]
        massive = massive_tokens(tokens.float().norm(dim=-1))
        self.massive += int(massive.sum())
        update = tokens - inputs[mask].to(tokens.dtype)
        self.stats.update(update[~massive])
        self.reservoir.observe(batch_index, output, batch, drop=massive)

    def layer_values(self, layer: int) -> dict[str, float]:
        values = {
            "information": matrix_entropy(self.reservoir.sample()),
            "update_variance": self.stats.variance,
            "reservoir_tokens": float(self.reservoir.sample().shape[0]),
            "massive_tokens": float(self.massive),
            "shared_prefix": float(self.prefix),
        }
        self.stats.reset()
        self.reservoir.reset()
        self.massive = 0
        return values

    def finish(self, model: StreamedModel, result: PassResult) -> list[LayerScores]:
        info = pass_layer_values(result.records, "information")
        variance = pass_layer_values(result.records, "update_variance")
        filled = pass_layer_values(result.records, "reservoir_tokens")
        massive = pass_layer_values(result.records, "massive_tokens")
        prefix = pass_layer_values(result.records, "shared_prefix")
        stab = [-v for v in variance]
        z_info, z_stab = zscore(info), zscore(stab)
        importance = [ALPHA * a + BETA * b for a, b in zip(z_info, z_stab, strict=True)]
        sensitivity = exp_sensitivity(importance)
        return [
            LayerScores(
                scores={
                    "information": info[l],
                    "effective_rank": math.exp(info[l]),
                    "stability": stab[l],
                    "update_variance": variance[l],
                    "z_information": z_info[l],
                    "z_stability": z_stab[l],
                    "reservoir_tokens": filled[l],
                    "massive_tokens": massive[l],
                    "shared_prefix": prefix[l],
                },
                importance=importance[l],
                sensitivity=sensitivity[l],
            )
            for l in range(len(result.records))
        ]
