"""TAQ-KL: how much the next-token distribution at the end of the prompt moves when only layer l
is quantized.

For layer l: the layer's weights are replaced by their codes at the probe width b (the lowest
allowed width below 16), the codes the layer pass stored with the job's quantizer (RTN or GPTQ:
the error the job would really ship, not noise); the score is the mean over sequences of
KL(p_fp ‖ p_l) of the next-token distribution at the last prompt token, the position that
predicts the answer (the paper's reference code measures the last token; chat-template and
instruction positions, most of a prompt, are left out).

Deviation from the first version (noise of one quantization step of the layer's whole output
range, KL averaged over every position): that width was set by the attention-sink token's
massive activations (noise std ≈ 480 against activation std 6–24 on SmolLM2's middle layers), so
the probe destroyed the stream instead of probing it, and template positions dominated the mean.

Streaming: at layer l the quantized layer starts a probe stream from the layer's full-precision
input (the codes the pass just stored), and every later layer carries it next to the clean one
(O(L) layer reads, L probe streams at the end, spilled to disk past the pass's memory limit);
after the last layer the LM head is applied in vocabulary chunks at the last prompt positions
only, to the clean stream and every probe stream together (`core.streaming.head`).

sensitivity = KL (≥ 0); importance = KL. The KL is a damage measured at the probe width, so the
allocator's predicted loss at width b is KL · e_l(b) / e_l(probe) (`damage_scaled`), not
KL · e_l(b), which would count the error twice.
"""

from __future__ import annotations

import torch

from core.calibration import Batch
from core.scorers.common import LayerScores, damage_scaled, lowest_bits
from core.spec import JobSpec
from core.streaming.head import HeadQuery, head_stats
from core.streaming.hidden import HiddenStream
from core.streaming.layer_pass import LayerStep, PassResult, StreamScorer
from core.streaming.model import StreamedModel

__all__ = ["TaqKlScorer", "last_prompt_hidden"]


def last_prompt_hidden(stream: HiddenStream, batches: list[Batch]) -> torch.Tensor:
    """The hidden state at each sequence's last valid token, [sequences, H], in batch order."""
    parts = []
    for b, batch in enumerate(batches):
        hidden = stream.get(b)
        last = (batch.attention_mask.sum(dim=1) - 1).to(hidden.device)
        parts.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
    return torch.cat(parts)


class TaqKlScorer(StreamScorer):
    method = "taq_kl"

    def __init__(self, spec: JobSpec) -> None:
        self.bits = lowest_bits(spec.bit_choices)

    def perturb(self, step: LayerStep) -> dict[str, HiddenStream]:
        name = f"kl:{step.index}"
        codes = None if self.bits >= 16 else step.codes(self.bits)
        return {name: step.run(step.inputs, codes, name)}

    def finish(self, model: StreamedModel, result: PassResult) -> list[LayerScores]:
        n_layers = len(result.records)
        assert result.final is not None  # taq_kl needs calibration rows (check_rows)
        queries = [HeadQuery(hidden=last_prompt_hidden(result.final, result.batches))]
        for layer in range(n_layers):
            stream = result.streams.pop(f"kl:{layer}")
            queries.append(HeadQuery(hidden=last_prompt_hidden(stream, result.batches), reference=0))
            stream.drop()
        stats = head_stats(model, queries)
        kls = [max(0.0, float(s.kl.mean())) if s.kl is not None and s.kl.numel() else 0.0 for s in stats[1:]]
        widths = sorted(b for b in result.records[0].widths if b < 16) if result.records else []
        return [
            LayerScores(
                scores={"kl": kls[l], "probe_bits": float(self.bits)},
                importance=kls[l],
                sensitivity=kls[l],
                predicted_loss=damage_scaled(kls[l], result.records[l], self.bits, widths),
            )
            for l in range(n_layers)
        ]
