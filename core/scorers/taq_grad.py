"""TAQ-Grad: the task loss's own second-order estimate of what every format costs every linear.

Task loss. L = the mean over sequences of the mean negative log-likelihood of each sequence's
answer tokens, teacher-forced on prompt + answer (the sequences of `taqo`: one per gold answer;
rows without answers get the full-precision model's own greedy answer).

Prediction. For linear j (output Y_j = X_j W_jᵀ) quantized at width b, ΔY_j(b) = X_j (Ŵ_j(b) − W_j)ᵀ
with Ŵ_j(b) the codes the layer pass stored (RTN or GPTQ: what the job ships). The loss increase
is predicted with the diagonal empirical Fisher, as NVIDIA ModelOpt's gradient AutoQuantize does:

    predicted_j(b) = ½ · N · Σ_{sequences, positions, outputs} (∂L/∂Y_j)² · ΔY_j(b)²

(L is a mean over N sequences, so N·(∂L/∂Y)² is the mean of the per-sequence squared gradients).
A layer's prediction is the sum of its linears'. The allocator minimises Σ predicted directly
(`LayerProfile.predicted_loss`, `LinearProfile.predicted_loss`); no sensitivity multiplies a
measured error. importance = the layer's prediction at the lowest width; sensitivity = that
prediction / the layer's relative error at the lowest width (so s·e equals the prediction there;
reported for comparison with the other methods, not used by the allocator).

Streaming. The layer pass keeps each layer's full-precision input (one hidden stream per layer,
spilled to disk past the pass's limit). After the last layer, ∂L/∂h_L at the answer positions
comes from the head read in vocabulary chunks (`core.streaming.head.head_nll_gradient`). Then the
layers are onloaded again from the last to the first: each recomputes its forward from its
stored input with autograd on (no weight gradients), ∂L/∂(output) flows back through it, hooks
capture every linear's input X_j and output gradient ∂L/∂Y_j, and ΔY_j(b) is formed from the
stored codes for every width. The model is read twice (the pass and this sweep); the extra work
is one forward, one activation-only backward and one X·ΔWᵀ per width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from core.calibration import Batch
from core.quant.primitives import dequantize_weight
from core.scorers.common import LayerScores, SequencePlan, lowest_bits, record_error
from core.scorers.taqo import MAX_NEW_TOKENS, Generate, answer_plan, answer_positions, gather_positions
from core.spec import CalibrationRow, JobSpec
from core.streaming.head import head_nll_gradient
from core.streaming.hidden import HiddenStream
from core.streaming.layer_pass import LayerStep, PassResult, StreamScorer
from core.streaming.model import StreamedModel

__all__ = ["TaqGradScorer", "position_weights"]


def position_weights(seq: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """w_i = 1 / (answer tokens of position i's sequence · sequences): Σ_i w_i·NLL_i is the mean
    over sequences of each sequence's mean answer NLL."""
    counts = torch.zeros(n_sequences, dtype=torch.float64).index_add_(0, seq, torch.ones(len(seq), dtype=torch.float64))
    present = int((counts > 0).sum())
    return (1.0 / (counts[seq] * max(present, 1))).to(torch.float32)


class TaqGradScorer(StreamScorer):
    method = "taq_grad"

    def __init__(
        self, spec: JobSpec, *, generate: Generate | None = None, max_new_tokens: int = MAX_NEW_TOKENS
    ) -> None:
        self.widths = sorted(b for b in spec.bit_choices if b < 16)
        self.probe_bits = lowest_bits(spec.bit_choices)
        self.generate = generate
        self.max_new_tokens = max_new_tokens
        self.model_answers = 0.0
        self.sequence_plan: SequencePlan | None = None
        self.inputs: dict[int, HiddenStream] = {}

    def plan(self, tokenizer: Any, rows: Sequence[CalibrationRow], spec: JobSpec) -> SequencePlan:
        self.sequence_plan, self.model_answers = answer_plan(
            tokenizer, rows, spec, generate=self.generate, max_new_tokens=self.max_new_tokens
        )
        return self.sequence_plan

    def perturb(self, step: LayerStep) -> dict[str, HiddenStream]:
        # not a probe stream (those run through later layers): the input kept for the backward sweep
        kept = HiddenStream(step.inputs.area, len(step.inputs), f"grad_in:{step.index}")
        for b in range(len(step.inputs)):
            kept.put(b, step.inputs.get(b))
        self.inputs[step.index] = kept
        return {}

    def finish(self, model: StreamedModel, result: PassResult) -> list[LayerScores]:
        plan = self.sequence_plan
        assert plan is not None and result.final is not None and result.codes is not None
        positions = answer_positions(result.batches, plan)
        weights = position_weights(positions.seq, len(plan.sequences))
        head = head_nll_gradient(model, gather_positions(result.final, positions), positions.gold, weights)
        fp_loss = float((head.nll * weights.double()).sum())
        grads = _scatter(result.final, positions.per_batch, head.grad)
        n_sequences = int(torch.unique(positions.seq).numel())
        predicted: list[dict[str, dict[int, float]]] = [{} for _ in result.records]
        for index in reversed(range(len(result.records))):
            stream = self.inputs.pop(index)
            acc, grads_in = _layer_backward(
                model, index, stream, grads, result.calls, result.batches, self.widths, result.codes
            )
            stream.drop()
            grads.drop()
            grads = grads_in
            predicted[index] = {
                name: {b: 0.5 * n_sequences * v for b, v in by_width.items()} for name, by_width in acc.items()
            }
        grads.drop()
        out = []
        for record, linears in zip(result.records, predicted, strict=True):
            layer_pred = {b: sum(lin[b] for lin in linears.values()) for b in self.widths}
            low = self.probe_bits
            error_low = record_error(record, low) if low < 16 else 0.0
            importance = layer_pred.get(low, 0.0)
            scores = {f"predicted_loss_{b}": layer_pred[b] for b in self.widths}
            scores.update(fp_nll=fp_loss, probe_bits=float(low), model_answers=self.model_answers)
            out.append(
                LayerScores(
                    scores=scores,
                    importance=importance,
                    sensitivity=importance / error_low if error_low > 0 else 0.0,
                    predicted_loss=linears,
                )
            )
        return out


def _scatter(
    final: HiddenStream, per_batch: list[tuple[torch.Tensor, torch.Tensor]], grad: torch.Tensor
) -> HiddenStream:
    """∂L/∂h_L per batch: the answer positions' gradients in zeros shaped like the final stream."""
    out = HiddenStream(final.area, len(final), "grad")
    offset = 0
    for b, (rows, pos) in enumerate(per_batch):
        hidden = final.get(b)
        full = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        n = int(rows.numel())
        if n:
            full[rows.to(hidden.device), pos.to(hidden.device)] = grad[offset : offset + n].to(hidden.dtype)
        offset += n
        out.put(b, full)
    return out


def _layer_backward(
    model: StreamedModel,
    index: int,
    inputs: HiddenStream,
    grads_out: HiddenStream,
    calls: list[list[Any]],
    batches: list[Batch],
    widths: list[int],
    codes: Callable[[int, int], dict[str, Any]],
) -> tuple[dict[str, dict[int, float]], HiddenStream]:
    """Σ (∂L/∂Y_j)²·ΔY_j(b)² per linear and width of one layer, and ∂L/∂(the layer's input)."""
    ref = model.layers[index]
    acc = {name: dict.fromkeys(widths, 0.0) for name in ref.linears}
    grads_in = HiddenStream(inputs.area, len(inputs), "grad")
    with model.onloaded(ref.name) as layer:
        for param in layer.parameters():
            param.requires_grad_(False)
        # the codes stay packed (about a byte a weight); one ΔW is formed at a time
        stored = {bits: codes(index, bits) for bits in widths}
        weights = {name: linear.weight.detach().float() for name, linear in ref.linears.items()}
        seen_inputs: dict[str, torch.Tensor] = {}
        seen_grads: dict[str, torch.Tensor] = {}

        def hook(name: str) -> Callable[..., None]:
            def record(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
                seen_inputs[name] = args[0].detach()
                output.register_hook(lambda g: seen_grads.__setitem__(name, g.detach()))  # type: ignore[no-untyped-call]

            return record

        handles = [lin.register_forward_hook(hook(name)) for name, lin in ref.linears.items()]
        try:
            for b in range(len(inputs)):
                x = inputs.get(b).detach().requires_grad_(True)
                call = calls[b][index]
                with torch.enable_grad():
                    out = layer(x, *call.args, **call.kwargs)
                    out = out[0] if isinstance(out, tuple | list) else out
                    out.backward(grads_out.get(b).to(out.dtype))
                valid = batches[b].valid.to(x.device)
                for name, weight in weights.items():
                    x_j = seen_inputs.pop(name)[valid].float()
                    g2 = seen_grads.pop(name)[valid].float().square()
                    for bits in widths:
                        delta = dequantize_weight(stored[bits][name]).to(weight.device) - weight
                        dy = x_j @ delta.T
                        acc[name][bits] += float((g2 * dy.square()).sum(dtype=torch.float64))
                assert x.grad is not None  # x is a leaf that requires grad
                grads_in.put(b, x.grad.detach())
        finally:
            for handle in handles:
                handle.remove()
    return acc, grads_in
