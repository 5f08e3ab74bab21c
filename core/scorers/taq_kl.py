"""TAQ-KL: how much the next-token distribution moves when a layer's output is perturbed by
noise of the size its quantization would cause.

For layer l: uniform noise U(-w/2, w/2) with w = noise_scale · (max − min of the layer's output
activations over all valid calibration tokens) / (2^b − 1), b = the lowest allowed width below 16,
is added to the layer's full-precision output; the score is the mean over all valid calibration
positions of KL(p_fp ‖ p_noised) of the next-token distribution.

Streaming: the layer pass onloads every layer once. At layer l the noised output starts a probe
stream that every later layer carries next to the clean one (O(L) layer reads, L probe streams at
the end, spilled to disk past the pass's memory limit); after the last layer the LM head is applied
in vocabulary chunks to the clean stream and every probe stream together (`core.streaming.head`).
Noise comes from a CPU `torch.Generator` seeded per layer and drawn batch by batch, so it does
not depend on the device and a resumed pass redraws it exactly.

sensitivity = KL (≥ 0); importance = KL. The KL is a damage measured at the lowest width's step,
so the allocator's predicted loss at width b is KL · e_l(b) / e_l(lowest) (`damage_scaled`), not
KL · e_l(b), which would count the error twice.
"""

from __future__ import annotations

import torch

from core.calibration import Batch
from core.scorers.common import LayerOutputStats, LayerScores, damage_scaled, lowest_bits
from core.spec import JobSpec
from core.streaming.head import HeadQuery, head_stats
from core.streaming.hidden import HiddenStream
from core.streaming.layer_pass import LayerStep, PassResult, StreamScorer, pass_layer_values
from core.streaming.model import StreamedModel

__all__ = ["TaqKlScorer", "layer_noise_seed", "valid_hidden"]


def layer_noise_seed(seed: int, layer: int) -> int:
    return (seed * 1_000_003 + 7919 * (layer + 1)) % (2**63 - 1)


def valid_hidden(stream: HiddenStream, batches: list[Batch]) -> torch.Tensor:
    """Every valid (non-padding) position of a stream, [N, H], in batch order."""
    return torch.cat([stream.get(b)[batch.valid.to(stream.get(b).device)] for b, batch in enumerate(batches)])


class TaqKlScorer(StreamScorer):
    method = "taq_kl"

    def __init__(self, spec: JobSpec, *, noise_scale: float = 1.0) -> None:
        self.seed = spec.seed
        self.bits = lowest_bits(spec.bit_choices)
        self.noise_scale = noise_scale
        self.stats = LayerOutputStats()
        self.width: dict[int, float] = {}

    def observe(self, layer: int, batch_index: int, output: torch.Tensor, batch: Batch) -> None:
        self.stats.observe(output, batch)

    def layer_values(self, layer: int) -> dict[str, float]:
        value_range = self.stats.value_range
        self.stats.reset()
        self.width[layer] = self.noise_scale * value_range / (2**self.bits - 1)
        return {"activation_range": value_range, "noise_width": self.width[layer]}

    def restore(self, layer: int, values: dict[str, float]) -> None:
        self.width[layer] = values["noise_width"]

    def perturb(self, step: LayerStep) -> dict[str, HiddenStream]:
        width = self.width[step.index]
        generator = torch.Generator(device="cpu").manual_seed(layer_noise_seed(self.seed, step.index))
        noised = HiddenStream(step.outputs.area, len(step.outputs), f"kl:{step.index}")
        for b in range(len(step.outputs)):
            out = step.outputs.get(b)
            if width > 0:
                noise = (torch.rand(out.shape, generator=generator, dtype=torch.float32) - 0.5) * width
                out = out + noise.to(device=out.device, dtype=out.dtype)
            noised.put(b, out)
        return {f"kl:{step.index}": noised}

    def finish(self, model: StreamedModel, result: PassResult) -> list[LayerScores]:
        n_layers = len(result.records)
        assert result.final is not None  # taq_kl needs calibration rows (check_rows)
        queries = [HeadQuery(hidden=valid_hidden(result.final, result.batches))]
        for layer in range(n_layers):
            stream = result.streams.pop(f"kl:{layer}")
            queries.append(HeadQuery(hidden=valid_hidden(stream, result.batches), reference=0))
            stream.drop()
        stats = head_stats(model, queries)
        kls = [max(0.0, float(s.kl.mean())) if s.kl is not None and s.kl.numel() else 0.0 for s in stats[1:]]
        ranges = pass_layer_values(result.records, "activation_range")
        widths_of_noise = pass_layer_values(result.records, "noise_width")
        widths = sorted(b for b in result.records[0].widths if b < 16) if result.records else []
        return [
            LayerScores(
                scores={
                    "kl": kls[l],
                    "noise_width": widths_of_noise[l],
                    "noise_bits": float(self.bits),
                    "activation_range": ranges[l],
                },
                importance=kls[l],
                sensitivity=kls[l],
                predicted_loss=damage_scaled(kls[l], result.records[l], self.bits, widths),
            )
            for l in range(n_layers)
        ]
