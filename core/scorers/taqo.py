"""TAQO (TAQ-O, the oracle): Δ_l = drop of the task score when only layer l is quantized.

Targets. Rows with `answers` are scored against them. Rows without answers are scored against
the full-precision model's own greedy answer (at most `max_new_tokens` = 16 new tokens, greedy,
deterministic, ending at the first EOS, which is part of the target), so Δ then measures how
much quantizing a layer makes the model deviate from what it would have answered.

Task score, teacher-forced on prompt + answer tokens (one sequence per gold answer):
* `em`: the argmax at every answer position equals the gold token ⇔ greedy generation starts
  with that answer; a row's value is the best over its gold answers;
* `token_accuracy`: fraction of answer tokens predicted by the argmax (best over answers);
* `nll`: mean negative log-likelihood of the answer tokens (best = lowest over answers).
All three are averaged over rows. Each layer is quantized with the real `quantize_weight` at the
lowest allowed width (< 16) with the job's group size / symmetry / clip search.

Δ_em, Δ_token_accuracy are fp − quantized; Δ_nll is quantized − fp (all "how much worse").
EM alone is too coarse on small calibration sets (most layers have Δ_em = 0), so
importance = Δ_nll (the continuous task-loss increase), and
sensitivity = max(Δ_nll, 0) + floor, floor = 1 % of the mean positive Δ_nll (1e-6 when all are 0):
non-negative, and no layer is treated as free to quantize, which keeps ties resolved by the
measured quantization error. Δ already is the damage of the probe width's error, so the allocator
does not multiply it by the error again: the predicted loss at width b is
sensitivity · e_l(b) / e_l(probe) (`core.scorers.common.damage_scaled`).

Streaming: prompts + answers are the layer pass's calibration sequences (so GPTQ's statistics and
the shipped weights come from the same tokens). At layer l the layer quantized at the probe width
(the codes the pass just stored) starts a probe stream from the layer's full-precision input, and
every later layer carries it next to the clean stream; after the last layer the LM head is applied
in vocabulary chunks at the answer positions only, to the clean stream and every probe stream
together (`core.streaming.head`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from core.calibration import Batch
from core.data import encode_text, tokenize_rows
from core.scorers.common import LayerScores, SequencePlan, damage_scaled, floored_damages, lowest_bits
from core.spec import CalibrationRow, JobSpec
from core.streaming.head import HeadQuery, head_stats
from core.streaming.hidden import HiddenStream
from core.streaming.layer_pass import LayerStep, PassResult, StreamScorer
from core.streaming.model import StreamedModel

__all__ = [
    "MAX_ANSWER_TOKENS",
    "MAX_NEW_TOKENS",
    "TaqoScorer",
    "TaskScore",
    "answer_plan",
    "answer_positions",
    "gather_positions",
]

MAX_NEW_TOKENS = 16  # length of the fp model's own answers when rows carry none
MAX_ANSWER_TOKENS = 32  # gold answers are cut to this many tokens

#: greedy continuations of token-id prompts: generate(prompts, max_new_tokens) -> answers (ids, EOS included)
Generate = Callable[[list[list[int]], int], list[list[int]]]


@dataclass(frozen=True)
class TaskScore:
    em: float
    token_accuracy: float
    nll: float


@dataclass(frozen=True)
class AnswerPositions:
    """Scored positions of all batches: logits at (batch row, position) predict `gold`, for
    sequence `seq`; `batch_slices[b]` selects batch b's entries."""

    gold: torch.Tensor
    seq: torch.Tensor
    per_batch: list[tuple[torch.Tensor, torch.Tensor]]  # (rows, positions) per batch


def answer_positions(batches: list[Batch], plan: SequencePlan) -> AnswerPositions:
    gold, seq, per_batch = [], [], []
    for batch in batches:
        rows, positions = [], []
        for r, s in enumerate(batch.rows):
            start = plan.starts[s]
            if start is None:
                continue
            for t in range(start, len(plan.sequences[s])):
                rows.append(r)
                positions.append(t - 1)
                gold.append(plan.sequences[s][t])
                seq.append(s)
        per_batch.append((torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long)))
    return AnswerPositions(
        gold=torch.tensor(gold, dtype=torch.long), seq=torch.tensor(seq, dtype=torch.long), per_batch=per_batch
    )


def gather_positions(stream: HiddenStream, positions: AnswerPositions) -> torch.Tensor:
    parts = []
    for b, (rows, pos) in enumerate(positions.per_batch):
        if rows.numel():
            hidden = stream.get(b)
            parts.append(hidden[rows.to(hidden.device), pos.to(hidden.device)])
    return torch.cat(parts)


def task_score(logprob: torch.Tensor, correct: torch.Tensor, seq: torch.Tensor, plan: SequencePlan) -> TaskScore:
    """Per sequence: all-correct (EM), token accuracy, mean NLL; per row the best over its
    sequences; then the mean over rows."""
    n_seq = len(plan.sequences)
    count = torch.zeros(n_seq, dtype=torch.float64).index_add_(0, seq, torch.ones_like(logprob))
    hits = torch.zeros(n_seq, dtype=torch.float64).index_add_(0, seq, correct.to(torch.float64))
    nll = torch.zeros(n_seq, dtype=torch.float64).index_add_(0, seq, -logprob)
    em = (hits == count).to(torch.float64)
    acc = hits / count.clamp_min(1.0)
    nll = nll / count.clamp_min(1.0)
    best_em = [0.0] * plan.n_rows
    best_acc = [0.0] * plan.n_rows
    best_nll = [float("inf")] * plan.n_rows
    for s, r in enumerate(plan.row_of):
        best_em[r] = max(best_em[r], float(em[s]))
        best_acc[r] = max(best_acc[r], float(acc[s]))
        best_nll[r] = min(best_nll[r], float(nll[s]))
    n = plan.n_rows
    return TaskScore(em=sum(best_em) / n, token_accuracy=sum(best_acc) / n, nll=sum(best_nll) / n)


def answer_plan(
    tokenizer: Any,
    rows: Sequence[CalibrationRow],
    spec: JobSpec,
    *,
    generate: Generate | None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> tuple[SequencePlan, float]:
    """prompt + answer per gold answer; rows without answers get the full-precision model's own
    greedy answer (needs `generate`). Returns the plan and the share of rows answered by the model."""
    prompts = tokenize_rows(rows, tokenizer, spec.max_tokens)
    missing = [i for i, row in enumerate(rows) if not row.answers]
    generated: dict[int, list[int]] = {}
    if missing:
        if generate is None:
            raise ValueError(f"{spec.method.value} needs the full-precision model's answers for rows without answers")
        generated = dict(zip(missing, generate([prompts[i] for i in missing], max_new_tokens)))
    sequences: list[list[int]] = []
    row_of: list[int] = []
    starts: list[int | None] = []
    for i, row in enumerate(rows):
        answers = (
            [generated[i]]
            if i in generated
            else [encode_text(a, tokenizer, templated=True)[:MAX_ANSWER_TOKENS] for a in row.answers or [] if a.strip()]
        )
        for answer in answers:
            if answer:
                sequences.append(list(prompts[i]) + list(answer))
                starts.append(len(prompts[i]))
                row_of.append(i)
    plan = SequencePlan(sequences=sequences, row_of=row_of, starts=starts, n_rows=len(rows))
    return plan, len(missing) / max(1, len(rows))


class TaqoScorer(StreamScorer):
    method = "taqo"

    def __init__(
        self,
        spec: JobSpec,
        *,
        generate: Generate | None = None,
        bits: int | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        self.bits = lowest_bits(spec.bit_choices) if bits is None else bits
        self.generate = generate
        self.max_new_tokens = max_new_tokens
        self.model_answers = 0.0
        self.sequence_plan: SequencePlan | None = None

    def plan(self, tokenizer: Any, rows: Sequence[CalibrationRow], spec: JobSpec) -> SequencePlan:
        self.sequence_plan, self.model_answers = answer_plan(
            tokenizer, rows, spec, generate=self.generate, max_new_tokens=self.max_new_tokens
        )
        return self.sequence_plan

    def perturb(self, step: LayerStep) -> dict[str, HiddenStream]:
        if self.bits >= 16:
            return {f"q:{step.index}": step.run(step.inputs, None, f"q:{step.index}")}
        return {f"q:{step.index}": step.run(step.inputs, step.codes(self.bits), f"q:{step.index}")}

    def finish(self, model: StreamedModel, result: PassResult) -> list[LayerScores]:
        plan = self.sequence_plan
        assert plan is not None and result.final is not None  # plan() ran and the pass had rows
        positions = answer_positions(result.batches, plan)
        n_layers = len(result.records)
        queries = [HeadQuery(hidden=gather_positions(result.final, positions), gold=positions.gold)]
        for layer in range(n_layers):
            stream = result.streams.pop(f"q:{layer}")
            queries.append(HeadQuery(hidden=gather_positions(stream, positions), gold=positions.gold))
            stream.drop()
        stats = head_stats(model, queries)
        # every query has gold tokens, so every gold_logprob is set
        scores = [
            task_score(cast(torch.Tensor, s.gold_logprob), s.argmax == positions.gold, positions.seq, plan)
            for s in stats
        ]
        fp, quantized = scores[0], scores[1:]
        widths = sorted(b for b in result.records[0].widths if b < 16) if result.records else []
        d_nll = [q.nll - fp.nll for q in quantized]
        sensitivity = floored_damages(d_nll)
        return [
            LayerScores(
                scores={
                    "em": q.em,
                    "token_accuracy": q.token_accuracy,
                    "nll": q.nll,
                    "fp_em": fp.em,
                    "fp_token_accuracy": fp.token_accuracy,
                    "fp_nll": fp.nll,
                    "delta_em": fp.em - q.em,
                    "delta_token_accuracy": fp.token_accuracy - q.token_accuracy,
                    "delta_nll": d_nll[l],
                    "probe_bits": float(self.bits),
                    "model_answers": self.model_answers,
                },
                importance=d_nll[l],
                sensitivity=sensitivity[l],
                predicted_loss=damage_scaled(sensitivity[l], result.records[l], self.bits, widths),
            )
            for l, q in enumerate(quantized)
        ]
