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
measured quantization error.

Cost: prompts + answers go through one fp pass that caches layer 0's inputs and every layer's
call arguments and accumulates the Hessians; for layer l the layer's quant_error is measured
(its weights at the probe width are reused for the probe), only layers l..L-1 run (logits only
at answer positions), then the cache advances one layer with the fp layer l.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from core.calibration import Batch, HessianCollector, StageProgress, head_logits, pad_token_id, run_fp_pass
from core.data import encode_text
from core.models import LoadedModel
from core.scorers.common import (LayerQuantization, LayerScores, build_profile, calibration_batches,
                                 layer_quant_errors, lowest_bits, prompt_sequences, quantized_layer, select_rows)
from core.spec import CalibrationRow, JobSpec
from core.types import CancelFn, Profile, ProgressFn, never_cancel, no_progress

__all__ = ["MAX_ANSWER_TOKENS", "MAX_NEW_TOKENS", "TaskScore", "greedy_answers", "score_taqo"]

MAX_NEW_TOKENS = 16      # length of the fp model's own answers when rows carry none
MAX_ANSWER_TOKENS = 32   # gold answers are cut to this many tokens


@dataclass(frozen=True)
class TaskScore:
    em: float
    token_accuracy: float
    nll: float


@dataclass(frozen=True)
class _Targets:
    """Answer positions of one batch: logits at (row, pos) predict `gold`, for sequence `seq`."""

    rows: torch.Tensor
    positions: torch.Tensor
    gold: torch.Tensor
    seq: torch.Tensor  # cpu


def _eos_ids(loaded: LoadedModel) -> list[int]:
    ids: list[int] = []
    config = getattr(loaded.model, "generation_config", None)
    value = getattr(config, "eos_token_id", None) if config is not None else None
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(v, int):
            ids.append(v)
    tok = getattr(loaded.tokenizer, "eos_token_id", None)
    if isinstance(tok, int) and tok not in ids:
        ids.append(tok)
    return ids


def greedy_answers(loaded: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int = MAX_NEW_TOKENS,
                   batch_size: int = 16) -> list[list[int]]:
    """The model's greedy continuation of each prompt (token ids, up to and including the first
    EOS), batched with left padding and attention masks."""
    from transformers import GenerationConfig

    model = loaded.model
    device = loaded.device
    pad = pad_token_id(loaded.tokenizer)
    eos = _eos_ids(loaded)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad, eos_token_id=eos or None)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        group = order[start: start + batch_size]
        width = max(len(prompts[i]) for i in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, i in enumerate(group):
            seq = torch.as_tensor(list(prompts[i]), dtype=torch.long)
            ids[r, width - len(seq):] = seq
            mask[r, width - len(seq):] = 1
        with torch.no_grad():
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       generation_config=config)
        for r, i in enumerate(group):
            new = [int(t) for t in generated[r, width:].tolist()]
            answer: list[int] = []
            for t in new:
                answer.append(t)
                if t in eos:
                    break
            out[i] = answer
    return [out[i] for i in range(len(prompts))]


def _targets(batch: Batch, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> _Targets:
    rows, positions, gold, seq = [], [], [], []
    for r, s in enumerate(batch.rows):
        for t in range(starts[s], len(sequences[s])):
            rows.append(r)
            positions.append(t - 1)
            gold.append(sequences[s][t])
            seq.append(s)
    device = batch.input_ids.device
    return _Targets(rows=torch.tensor(rows, dtype=torch.long, device=device),
                    positions=torch.tensor(positions, dtype=torch.long, device=device),
                    gold=torch.tensor(gold, dtype=torch.long, device=device),
                    seq=torch.tensor(seq, dtype=torch.long))


class _Accumulator:
    def __init__(self, n_sequences: int) -> None:
        self.correct = torch.zeros(n_sequences, dtype=torch.float64)
        self.count = torch.zeros(n_sequences, dtype=torch.float64)
        self.nll = torch.zeros(n_sequences, dtype=torch.float64)

    def add(self, model: Any, stack: Any, hidden: torch.Tensor, targets: _Targets) -> None:
        with torch.no_grad():
            logits = head_logits(model, stack, hidden[targets.rows, targets.positions])
            logp = F.log_softmax(logits, dim=-1)
            correct = (logits.argmax(dim=-1) == targets.gold).to(torch.float64).cpu()
            nll = (-logp.gather(1, targets.gold[:, None])[:, 0]).to(torch.float64).cpu()
        self.correct.index_add_(0, targets.seq, correct)
        self.count.index_add_(0, targets.seq, torch.ones_like(correct))
        self.nll.index_add_(0, targets.seq, nll)

    def score(self, row_of: Sequence[int], n_rows: int) -> TaskScore:
        count = self.count.clamp_min(1.0)
        em = (self.correct == self.count).to(torch.float64)
        acc = self.correct / count
        nll = self.nll / count
        best_em = [0.0] * n_rows
        best_acc = [0.0] * n_rows
        best_nll = [float("inf")] * n_rows
        for s, r in enumerate(row_of):
            best_em[r] = max(best_em[r], float(em[s]))
            best_acc[r] = max(best_acc[r], float(acc[s]))
            best_nll[r] = min(best_nll[r], float(nll[s]))
        return TaskScore(em=sum(best_em) / n_rows, token_accuracy=sum(best_acc) / n_rows,
                         nll=sum(best_nll) / n_rows)


def _answer_ids(loaded: LoadedModel, answer: str) -> list[int]:
    return encode_text(answer, loaded.tokenizer, templated=True)[:MAX_ANSWER_TOKENS]


def score_taqo(loaded: LoadedModel, rows: Sequence[CalibrationRow], spec: JobSpec,
               progress: ProgressFn = no_progress, should_cancel: CancelFn = never_cancel, *,
               bits: int | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
               batch_tokens: int | None = None) -> Profile:
    """`bits` overrides the quantization width of the probed layer (default: lowest allowed)."""
    tracker = StageProgress(progress, should_cancel, "score")
    rows = select_rows(rows, spec)
    model = loaded.model
    n_layers = len(loaded.layers)
    bits = lowest_bits(spec.bit_choices) if bits is None else bits
    prompts = prompt_sequences(loaded, rows, spec)

    # targets: gold answers, or the fp model's own greedy answers for rows without any
    missing = [i for i, row in enumerate(rows) if not row.answers]
    generated: dict[int, list[int]] = {}
    if missing:
        tracker.report(0.0, f"generating full-precision answers for {len(missing)} rows")
        tracker.check()
        answers = greedy_answers(loaded, [prompts[i] for i in missing], max_new_tokens)
        generated = dict(zip(missing, answers))
        tracker.report(0.1, "full-precision answers generated")
    sequences, starts, row_of = [], [], []
    for i, row in enumerate(rows):
        targets = [generated[i]] if i in generated else [_answer_ids(loaded, a) for a in row.answers or []
                                                          if a.strip()]
        for answer in targets:
            if not answer:
                continue
            sequences.append(list(prompts[i]) + list(answer))
            starts.append(len(prompts[i]))
            row_of.append(i)

    batches = calibration_batches(loaded, sequences, batch_tokens)
    targets_by_batch = [_targets(batch, sequences, starts) for batch in batches]
    hessians = HessianCollector(loaded)
    cache = run_fp_pass(loaded, batches, hessians=hessians, cache_inputs=True, tracker=tracker.span(0.1, 0.15))
    stack = cache.stack

    # full-precision reference through the same replay path
    reference = _Accumulator(len(sequences))
    for b in range(len(batches)):
        reference.add(model, stack, cache.replay(b), targets_by_batch[b])
    fp = reference.score(row_of, len(rows))

    layer_tracker = tracker.span(0.15, 1.0)
    quantized: list[TaskScore] = []
    quant_errors: list[LayerQuantization] = []
    for ref in loaded.layers:
        layer_tracker.check()
        acc = _Accumulator(len(sequences))
        # the probe reuses the weights quantized for the layer's quant_error at the probe width
        lq = layer_quant_errors(ref, hessians, spec, keep_bits=bits)
        hessians.release(list(ref.linears))
        quant_errors.append(replace(lq, kept={}))  # the weights are needed for this probe only
        with quantized_layer(ref, bits, spec, lq.kept):
            for b in range(len(batches)):
                acc.add(model, stack, cache.replay(b), targets_by_batch[b])
                layer_tracker.check()
        quantized.append(acc.score(row_of, len(rows)))
        if ref.index + 1 < n_layers:
            cache.advance()
        layer_tracker.report((ref.index + 1) / n_layers,
                             f"task score with {ref.name} at {bits} bits ({ref.index + 1}/{n_layers})")

    d_nll = [q.nll - fp.nll for q in quantized]
    positive = [max(0.0, d) for d in d_nll]
    mean_pos = sum(positive) / len(positive) if positive else 0.0
    floor = 0.01 * mean_pos if mean_pos > 0 else 1e-6
    layer_scores = []
    for l, q in enumerate(quantized):
        layer_scores.append(LayerScores(
            scores={"em": q.em, "token_accuracy": q.token_accuracy, "nll": q.nll,
                    "fp_em": fp.em, "fp_token_accuracy": fp.token_accuracy, "fp_nll": fp.nll,
                    "delta_em": fp.em - q.em, "delta_token_accuracy": fp.token_accuracy - q.token_accuracy,
                    "delta_nll": d_nll[l], "probe_bits": float(bits),
                    "model_answers": float(len(missing)) / max(1, len(rows))},
            importance=d_nll[l], sensitivity=positive[l] + floor))
    return build_profile(spec, loaded, "taqo", layer_scores, quant_errors)
