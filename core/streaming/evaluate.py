"""Teacher-forced evaluation of several weight variants in one layer pass, without model copies.

The eval rows become sequences: the rendered prompt followed by each gold answer (one sequence
per alias; a row without answers is its prompt alone). One layer pass carries a stream per
variant: at each layer the full-precision layer runs the reference stream, and for every variant
the same onloaded layer runs with that variant's dequantized codes swapped in
(`StreamedModel.swapped_linears`), so the model is read once whatever the number of variants.
After the last layer the LM head is applied in vocabulary chunks (`core.streaming.head`) at every
position that predicts a next token:

* `gold_nll`: mean negative log-likelihood of a gold answer's tokens given the prompt; per row the
  best (lowest) over its aliases; reported as the mean over rows with a bootstrap interval.
* `mean_kl` / `top1_agreement` against full precision at the answer positions of each row: the
  last prompt token (which predicts the answer's first token) and the positions predicting the
  rest of its first gold answer (a row without answers: the last prompt token only). Chat-template
  positions say little about the task, so they are left out. Token-weighted, plus per-row values.

Codes come from the layer pass's checkpoints: `codes(layer_index, bits)` returns that layer's
QuantizedWeights at a width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.calibration import StageProgress, make_batches, pad_token_id
from core.data import encode_text, tokenize_rows
from core.spec import CalibrationRow
from core.stats import ConfidenceInterval, bootstrap_ci
from core.streaming.capture import capture_inputs, run_layer
from core.streaming.head import HeadQuery, HeadStats, head_stats
from core.streaming.hidden import HiddenStream, SpillArea
from core.streaming.model import StreamedModel
from core.types import QuantizedWeight

__all__ = ["EvalVariant", "TeacherForced", "teacher_forced_eval"]

#: gold answers are scored on at most this many tokens
MAX_ANSWER_TOKENS = 32


@dataclass(frozen=True)
class EvalVariant:
    """A quantized model to evaluate: bits per linear (16 keeps the linear in full precision).
    `codes` (layer index, bits) -> QuantizedWeights overrides the pass-wide source of codes, so
    variants quantized by different passes (the bench's methods) share one evaluation pass; it may
    return already dequantized tensors (a third-party quantizer's weights, the bench's peers)."""

    name: str
    bits: dict[str, int]
    codes: Callable[[int, int], Mapping[str, QuantizedWeight | torch.Tensor]] | None = None


@dataclass(frozen=True)
class TeacherForced:
    """One variant's teacher-forced results; per-row lists follow the eval rows' order (None
    where a row has no answer)."""

    gold_nll_items: list[float | None]
    kl_items: list[float]
    top1_items: list[float]
    mean_kl: float
    top1_agreement: float
    n_tokens: int

    def gold_nll(self, *, seed: int = 0) -> ConfidenceInterval | None:
        values = [v for v in self.gold_nll_items if v is not None]
        return bootstrap_ci(values, seed=seed) if values else None

    def to_dict(self, *, seed: int = 0, include_items: bool = True) -> dict[str, Any]:
        nll = self.gold_nll(seed=seed)
        data: dict[str, Any] = {
            "gold_nll": None if nll is None else nll.to_dict(),
            "mean_kl": self.mean_kl,
            "top1_agreement": self.top1_agreement,
            "n_tokens": self.n_tokens,
        }
        if include_items:
            data["items"] = [
                {"gold_nll": g, "kl": k, "top1": t}
                for g, k, t in zip(self.gold_nll_items, self.kl_items, self.top1_items)
            ]
        return data


def _sequences(
    model: StreamedModel, rows: Sequence[CalibrationRow], max_tokens: int
) -> tuple[list[list[int]], list[list[int]], list[int], list[int | None]]:
    prompts = tokenize_rows(rows, model.tokenizer, max_tokens)
    sequences: list[list[int]] = []
    row_of: list[int] = []
    starts: list[int | None] = []
    for i, row in enumerate(rows):
        answers: list[list[int] | None] = [
            encode_text(a, model.tokenizer, templated=True)[:MAX_ANSWER_TOKENS]
            for a in (row.answers or [])
            if a.strip()
        ]
        answers = [a for a in answers if a] or [None]
        for answer in answers:
            sequences.append(list(prompts[i]) + (list(answer) if answer else []))
            starts.append(len(prompts[i]) if answer else None)
            row_of.append(i)
    return prompts, sequences, row_of, starts


def teacher_forced_eval(
    model: StreamedModel,
    rows: Sequence[CalibrationRow],
    variants: Sequence[EvalVariant],
    codes: Callable[[int, int], dict[str, QuantizedWeight]],
    *,
    max_tokens: int,
    tracker: StageProgress,
    area: SpillArea,
    batch_tokens: int = 2048,
) -> dict[str, TeacherForced]:
    """Results for "full_precision" and every variant (see the module docstring)."""
    prompts, sequences, row_of, starts = _sequences(model, rows, max_tokens)
    batches = make_batches(sequences, pad_token_id(model.tokenizer), model.device, max_batch_tokens=batch_tokens)
    captured = capture_inputs(model, batches)
    names = ["full_precision"] + [v.name for v in variants]
    streams = {name: HiddenStream(area, len(batches), name) for name in names}
    for b, hidden in enumerate(captured.hidden):
        for stream in streams.values():
            stream.put(b, hidden)
    captured.hidden.clear()
    n = model.n_layers
    for index, ref in enumerate(model.layers):
        tracker.check()
        cache: dict[tuple[int, int], Mapping[str, QuantizedWeight | torch.Tensor]] = {}

        def weights_for(variant: EvalVariant) -> dict[str, QuantizedWeight | torch.Tensor]:
            source = variant.codes or codes
            out = {}
            for linear in ref.linears:
                bits = variant.bits[linear]
                if bits < 16:
                    key = (id(source), bits)
                    if key not in cache:
                        cache[key] = source(index, bits)
                    out[linear] = cache[key][linear]
            return out

        with model.onloaded(ref.name) as layer:
            for name in names:
                variant = next((v for v in variants if v.name == name), None)
                swapped = weights_for(variant) if variant is not None else {}
                advanced = HiddenStream(area, len(batches), name)
                with model.swapped_linears(swapped):
                    for b in range(len(batches)):
                        advanced.put(b, run_layer(layer, streams[name].get(b), captured.calls[b][index]))
                streams[name].drop()
                streams[name] = advanced
        tracker.report((index + 1) / n, f"evaluated layer {index + 1}/{n} for {len(names)} variant(s)")
    # every position that predicts a next token inside its sequence, plus the last prompt token
    rows_idx, pos_idx, gold, seq_of = [], [], [], []
    per_batch = []
    for batch in batches:
        r_list, p_list = [], []
        for r, s in enumerate(batch.rows):
            length = len(sequences[s])
            for t in range(length):
                r_list.append(r)
                p_list.append(t)
                gold.append(sequences[s][t + 1] if t + 1 < length else 0)
                seq_of.append(s)
        per_batch.append((torch.tensor(r_list, dtype=torch.long), torch.tensor(p_list, dtype=torch.long)))
        rows_idx += r_list
        pos_idx += p_list
    gold_t = torch.tensor(gold, dtype=torch.long)

    def gather(stream: HiddenStream) -> torch.Tensor:
        parts = []
        for b, (r, p) in enumerate(per_batch):
            hidden = stream.get(b)
            parts.append(hidden[r.to(hidden.device), p.to(hidden.device)])
        return torch.cat(parts)

    queries = [HeadQuery(hidden=gather(streams[names[0]]), gold=gold_t)]
    for name in names[1:]:
        queries.append(HeadQuery(hidden=gather(streams[name]), gold=gold_t, reference=0))
    for stream in streams.values():
        stream.drop()
    stats = head_stats(model, queries)
    positions = torch.tensor(pos_idx, dtype=torch.long)
    seq_t = torch.tensor(seq_of, dtype=torch.long)
    return {
        name: _summarise(stat, stats[0], positions, seq_t, sequences, starts, row_of, len(rows), prompts)
        for name, stat in zip(names, stats)
    }


def _summarise(
    stat: HeadStats,
    reference: HeadStats,
    positions: torch.Tensor,
    seq_of: torch.Tensor,
    sequences: list[list[int]],
    starts: list[int | None],
    row_of: list[int],
    n_rows: int,
    prompts: list[list[int]],
) -> TeacherForced:
    first_seq: dict[int, int] = {}
    for s, r in enumerate(row_of):
        first_seq.setdefault(r, s)
    logprob = stat.gold_logprob
    assert logprob is not None  # every query of the evaluation has gold tokens
    kl = stat.kl if stat.kl is not None else torch.zeros_like(stat.lse)
    agree = (stat.argmax == reference.argmax).to(torch.float64)
    nll_sum = [0.0] * len(sequences)
    nll_count = [0] * len(sequences)
    kl_sum = [0.0] * n_rows
    top_sum = [0.0] * n_rows
    count = [0] * n_rows
    for k in range(len(positions)):
        s, t = int(seq_of[k]), int(positions[k])
        start = starts[s]
        if start is not None and start <= t + 1 < len(sequences[s]):
            nll_sum[s] -= float(logprob[k])
            nll_count[s] += 1
        r = row_of[s]
        last_prompt = len(prompts[r]) - 1
        if first_seq[r] == s and (t == last_prompt or (last_prompt <= t < len(sequences[s]) - 1)):
            kl_sum[r] += float(kl[k])
            top_sum[r] += float(agree[k])
            count[r] += 1
    best: list[float | None] = [None] * n_rows
    for s, r in enumerate(row_of):
        if nll_count[s]:
            value, current = nll_sum[s] / nll_count[s], best[r]
            best[r] = value if current is None else min(current, value)
    total = sum(count)
    return TeacherForced(
        gold_nll_items=best,
        kl_items=[kl_sum[r] / count[r] if count[r] else 0.0 for r in range(n_rows)],
        top1_items=[top_sum[r] / count[r] if count[r] else 0.0 for r in range(n_rows)],
        mean_kl=sum(kl_sum) / total if total else 0.0,
        top1_agreement=sum(top_sum) / total if total else 0.0,
        n_tokens=total,
    )
