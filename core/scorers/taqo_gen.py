"""TAQO as the paper scores it (`taqo_gen`): Δ_l = the drop of the task score 0.5·(EM + F1) of the
model's greedy answers when only layer l is quantized, clamped at 0.

`taqo` is the faster, teacher-forced variant of the same oracle (the NLL of the answer tokens, one
streamed forward per layer, no generation); this one is faithful to the paper and costs one greedy
generation over the calibration prompts per layer (plus one for full precision), so it needs the
whole model in memory (`core.streaming.generate`) and refuses, with `InvalidSpec`, a worker whose
memory limit cannot hold it.

Targets: a row's gold `answers`; a row without answers is scored against the full-precision
model's own greedy answer (so full precision scores 1.0 on it and Δ measures how far the quantized
layer moves the model from what it would have said). EM and F1 are `core.answers`' (normalised
text, best over the golds), on the decoded answer (special tokens dropped), at most
`max_new_tokens` new tokens (the eval's default, 16).

Quantization: layer l carries the codes the layer pass stored at the probe width (the lowest width
< 16 of the menu), the very codes the export ships at that width; the pass calibrates on the
rendered prompts, as the generation does.

importance = score(fp) − score(l) (signed); sensitivity = max(Δ, 0) + floor, floor = 1 % of the mean
positive Δ (1e-6 when every Δ is 0; greedy EM/F1 on a few hundred rows is coarse, so many layers
tie at 0 and the floor lets the measured error order them). Like `taqo`, Δ is a damage measured at
the probe width, so the allocator scales it by e_l(b) / e_l(probe) instead of multiplying by the
error again (`core.scorers.common.damage_scaled`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from core.answers import exact_match, f1_score
from core.scorers.common import LayerScores, damage_scaled, floored_damages, lowest_bits
from core.spec import CalibrationRow, JobSpec
from core.streaming.layer_pass import PassResult, StreamScorer
from core.streaming.model import StreamedModel
from core.types import QuantizedWeight

__all__ = ["GenerateVariants", "TaqoGenScorer", "task_score"]

MAX_NEW_TOKENS = 16

#: greedy answers of model variants: generate_variants(prompts, max_new_tokens, variants, codes) ->
#: per variant, per prompt, the answer's token ids (EOS included). A variant gives every linear a
#: width (16 = full precision); codes(layer_index, bits) reads a layer's stored codes.
GenerateVariants = Callable[
    [list[list[int]], int, list[dict[str, int]], Callable[[int, int], dict[str, QuantizedWeight]]],
    list[list[list[int]]],
]


def task_score(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    """Mean over rows of 0.5·(EM + F1) of each prediction against its row's golds."""
    if not predictions:
        return 0.0
    total = sum(0.5 * (exact_match(p, g) + f1_score(p, g)) for p, g in zip(predictions, golds, strict=True))
    return total / len(predictions)


class TaqoGenScorer(StreamScorer):
    method = "taqo_gen"

    def __init__(
        self,
        spec: JobSpec,
        *,
        generate_variants: GenerateVariants | None = None,
        bits: int | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        self.bits = lowest_bits(spec.bit_choices) if bits is None else bits
        self.generate_variants = generate_variants
        self.max_new_tokens = max_new_tokens
        self.prompts: list[list[int]] = []
        self.gold: list[list[str] | None] = []

    def plan(self, tokenizer: Any, rows: Sequence[CalibrationRow], spec: JobSpec) -> None:
        from core.data import tokenize_rows

        self.prompts = tokenize_rows(rows, tokenizer, spec.max_tokens)
        self.gold = [[a for a in row.answers if a.strip()] if row.answers else None for row in rows]
        return None  # the pass runs the rendered prompts, as the generation does

    def finish(self, model: StreamedModel, result: PassResult) -> list[LayerScores]:
        if self.generate_variants is None or result.codes is None:
            raise ValueError("taqo_gen needs greedy generation of model variants (generate_variants)")
        every = {name: 16 for ref in model.layers for name in ref.linears}
        variants = [dict(every)]
        for ref in model.layers:
            variants.append({**every, **dict.fromkeys(ref.linears, self.bits)})
        answers = self.generate_variants(self.prompts, self.max_new_tokens, variants, result.codes)
        texts = [[model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in a] for a in answers]
        fp_texts = texts[0]
        golds = [g if g else [fp_texts[i]] for i, g in enumerate(self.gold)]
        model_answers = sum(1 for g in self.gold if not g) / max(1, len(self.gold))
        fp = task_score(fp_texts, golds)
        quantized = [task_score(t, golds) for t in texts[1:]]
        drops = [fp - q for q in quantized]
        sensitivity = floored_damages(drops)
        widths = sorted(b for b in result.records[0].widths if b < 16) if result.records else []
        return [
            LayerScores(
                scores={
                    "score": q,
                    "fp_score": fp,
                    "delta_score": drops[l],
                    "probe_bits": float(self.bits),
                    "model_answers": model_answers,
                },
                importance=drops[l],
                sensitivity=sensitivity[l],
                predicted_loss=damage_scaled(sensitivity[l], result.records[l], self.bits, widths),
            )
            for l, q in enumerate(quantized)
        ]
