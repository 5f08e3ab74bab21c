"""TAQ-KL: how much the next-token distribution moves when a layer's output is perturbed by
noise of the size its quantization would cause.

For layer l: uniform noise U(-w/2, w/2) with w = noise_scale · (max − min of the layer's output
activations over all valid calibration tokens) / (2^b − 1), b = the lowest allowed width below 16,
is added to the layer's output; the score is the mean over all valid calibration positions of
KL(p_fp ‖ p_noised) of the next-token distribution.

Cost: one full-precision pass caches layer 0's input and every layer's call arguments (rotary
embeddings, per-layer masks); then for l = 0..L-1 only layers l..L-1 + final norm + LM head run,
and the cache advances by one layer (the fp output of layer l, computed anyway, becomes the input
of l+1). Only one layer's inputs are held at a time. Full-precision log-probabilities are cached
when they fit in `max_logprob_cache_bytes`, otherwise recomputed from the cached final hidden
states. Noise comes from a CPU `torch.Generator` seeded per layer, so it does not depend on the
device.

sensitivity = KL (≥ 0); importance = KL.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from core.calibration import Batch, HessianCollector, StageProgress, head_logits, run_fp_pass
from core.models import LoadedModel
from core.scorers.common import (LayerOutputStats, LayerScores, build_profile, calibration_batches, lowest_bits,
                                 prompt_sequences, quant_error_profile, select_rows)
from core.spec import CalibrationRow, JobSpec
from core.types import CancelFn, Profile, ProgressFn, never_cancel, no_progress

__all__ = ["layer_noise_seed", "score_taq_kl"]


def layer_noise_seed(seed: int, layer: int) -> int:
    return (seed * 1_000_003 + 7919 * (layer + 1)) % (2**63 - 1)


class _FinalHidden:
    """Keeps the valid-token outputs of the last decoder layer per batch."""

    def __init__(self, last: int) -> None:
        self.last = last
        self.hidden: dict[int, torch.Tensor] = {}

    def on_layer_output(self, layer: int, batch_index: int, hidden: torch.Tensor, batch: Batch) -> None:
        if layer == self.last:
            self.hidden[batch_index] = hidden[batch.valid].detach()


def score_taq_kl(loaded: LoadedModel, rows: Sequence[CalibrationRow], spec: JobSpec,
                 progress: ProgressFn = no_progress, should_cancel: CancelFn = never_cancel, *,
                 noise_scale: float = 1.0, batch_tokens: int | None = None,
                 max_logprob_cache_bytes: int = 1 << 30) -> Profile:
    tracker = StageProgress(progress, should_cancel, "score")
    rows = select_rows(rows, spec)
    model = loaded.model
    n_layers = len(loaded.layers)
    bits = lowest_bits(spec.bit_choices)
    batches = calibration_batches(loaded, prompt_sequences(loaded, rows, spec), batch_tokens)
    stats = LayerOutputStats(n_layers)
    final = _FinalHidden(n_layers - 1)
    hessians = HessianCollector(loaded)
    cache = run_fp_pass(loaded, batches, observers=(stats, final), hessians=hessians, cache_inputs=True,
                        tracker=tracker.span(0.0, 0.1))
    stack = cache.stack

    vocab = int(model.get_output_embeddings().weight.shape[0])
    vocab_bytes = 4 * sum(b.n_tokens for b in batches) * vocab
    fp_logp: dict[int, torch.Tensor] = {}

    def reference(b: int) -> torch.Tensor:
        if b in fp_logp:
            return fp_logp[b]
        with torch.no_grad():
            logp = F.log_softmax(head_logits(model, stack, final.hidden[b]), dim=-1)
        if vocab_bytes <= max_logprob_cache_bytes:
            fp_logp[b] = logp
        return logp

    kl_tracker = tracker.span(0.1, 0.9)
    kls, widths = [], []
    n_positions = sum(b.n_tokens for b in batches)
    for layer in range(n_layers):
        kl_tracker.check()
        width = noise_scale * stats.value_range(layer) / (2**bits - 1)
        generator = torch.Generator(device="cpu").manual_seed(layer_noise_seed(spec.seed, layer))
        total = torch.zeros((), dtype=torch.float64)
        outputs = []
        for b, batch in enumerate(batches):
            with torch.no_grad():
                out = cache.run_layer(layer, b, cache.hidden[b])
                outputs.append(out)
                if width > 0:
                    noise = (torch.rand(out.shape, generator=generator, dtype=torch.float32) - 0.5) * width
                    noised = out + noise.to(device=out.device, dtype=out.dtype)
                else:
                    noised = out
                h = cache.replay(b, layer + 1, hidden=noised)
                logp_q = F.log_softmax(head_logits(model, stack, h[batch.valid]), dim=-1)
                logp_fp = reference(b)
                p_fp = logp_fp.exp()
                kl = torch.where(p_fp > 0, p_fp * (logp_fp - logp_q), torch.zeros_like(p_fp)).sum(dim=-1)
                total += kl.to(torch.float64).sum().cpu()
            kl_tracker.check()
        cache.advance(outputs)
        kls.append(max(0.0, float(total) / max(1, n_positions)))
        widths.append(width)
        kl_tracker.report((layer + 1) / n_layers, f"KL under {bits}-bit noise: layer {layer + 1}/{n_layers}")

    layer_scores = [LayerScores(scores={"kl": kls[l], "noise_width": widths[l], "noise_bits": float(bits),
                                        "activation_range": stats.value_range(l)},
                                importance=kls[l], sensitivity=kls[l])
                    for l in range(n_layers)]
    quant_errors = quant_error_profile(loaded, hessians, spec, tracker.span(0.9, 1.0))
    return build_profile(spec, loaded, "taq_kl", layer_scores, quant_errors)
