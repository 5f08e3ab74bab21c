"""Closed loop (`closed_loop: true`): never ship an allocation that held-back rows measure as
worse than a task-agnostic one at the same budget.

Before scoring, a seeded quarter of the calibration rows that carry answers (at least
`MIN_HOLDOUT`) is held back: the layer pass never sees them. After allocation, each budget's
candidates are measured on them in ONE streamed teacher-forced pass (`core.streaming.evaluate`,
codes swapped into the onloaded layer, so the model is read once whatever the candidate count):

* `allocation` — the method's own allocation (per layer or per linear);
* `uniform` — uniform at equal effective bits (`core.controls.allocate_uniform_mix`, per layer);
* `error_only` — the same knapsack with the task taken out (`core.controls.allocate_error_only`);
* `swap k` — only when `swaps` > 0 (default `SWAPS` = 0, off): local search around the method's
  allocation (layer allocations only), one layer one choice lower and another one choice higher
  within the budget, the pairs whose predicted objective rises least. Off because the held-back
  metric is the NLL of the bare gold answer, which a swap can improve while breaking generation:
  on Gemma 3 270M (capitals) the loop shipped `swap 1` (held-back NLL 7.73 against 7.85) and the
  model stopped answering (`contains` 0.000 against 0.462; BENCHMARKS.md). Choosing between the
  three full allocations is not safe on that metric either: on the same model the loop shipped
  its own pass's allocation, which replies with a question on 109 of 173 items (BENCHMARKS.md,
  "The issue #14 measurement at HEAD"), hence the generation check below.

The teacher-forced NLL cannot see a model that stops answering, so when greedy generation fits
the worker (`core.job_generation.generation_skip_reason`) each candidate also answers the prompts
of every calibration row with answers, scored and held back alike (HOLDOUT_NEW_TOKENS greedy
tokens, scored for `contains` against the rows' answers), and a candidate that answers
significantly fewer of them than the best-answering candidate is not shipped (`answers_fewer`:
exact one-sided McNemar test at ANSWERS_ALPHA). Of the rest, the one with the lowest mean
gold-answer NLL on the held-back rows is shipped (ties: the order above, so the method's
allocation wins a tie). The allocation that is shipped carries the record
(`BitAllocation.closed_loop`: every candidate's rule, bits, effective bits, predicted objective,
measured NLL and `contains`, and which was shipped), so bitmap.json says when a baseline was
shipped instead.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from core.allocation import LayerCost, budget_units, layer_cost, objective_of, priced_allocation
from core.answers import answer_extractor, contains_match
from core.controls import allocate_error_only, allocate_uniform_mix
from core.errors import DataError
from core.scheme import QuantScheme
from core.spec import AllocationUnit, CalibrationRow
from core.types import BitAllocation, Profile, QuantizedWeight

if TYPE_CHECKING:
    from core.calibration import StageProgress
    from core.job_stages import JobRun
    from core.streaming.hidden import SpillArea
    from core.streaming.model import StreamedModel

__all__ = [
    "ANSWERS_ALPHA",
    "HOLDOUT_FRACTION",
    "HOLDOUT_NEW_TOKENS",
    "MIN_HOLDOUT",
    "SWAPS",
    "AnswersCheck",
    "Candidate",
    "answers_fewer",
    "closed_loop",
    "closed_loop_stage",
    "split_holdout",
    "swap_candidates",
]

HOLDOUT_FRACTION = 0.25
MIN_HOLDOUT = 4
SWAPS = 0
HOLDOUT_NEW_TOKENS = 16
ANSWERS_ALPHA = 0.05

#: greedy answers of model variants: generate(variants, progress) -> per variant (a width per
#: linear, 16 = full precision), per row of the check, the decoded answer
GenerateAnswers = Callable[[list[dict[str, int]], "StageProgress"], list[list[str]]]


@dataclass(frozen=True)
class AnswersCheck:
    """The generation check's inputs: the calibration rows with answers that every candidate
    answers and the `generate` that answers their prompts, kept together so answers and golds stay
    aligned; or, when generation does not fit the worker, only why (`skipped`)."""

    rows: Sequence[CalibrationRow] = ()
    generate: GenerateAnswers | None = None
    skipped: str | None = None


def split_holdout(rows: Sequence[CalibrationRow], seed: int) -> tuple[list[CalibrationRow], list[CalibrationRow]]:
    """(rows the pass scores, held-back rows): a seeded HOLDOUT_FRACTION of the rows with answers,
    at least MIN_HOLDOUT; DataError when fewer than MIN_HOLDOUT + 1 rows have answers."""
    answered = [i for i, row in enumerate(rows) if row.answers]
    count = max(MIN_HOLDOUT, round(HOLDOUT_FRACTION * len(answered)))
    if len(answered) < count + 1:
        raise DataError(
            f"closed_loop holds back {count} calibration rows with 'answers' to measure the allocation "
            f"and needs at least one more to score; {len(answered)} rows have answers",
            details=[],
        )
    held = set(random.Random(seed).sample(answered, count))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def answers_fewer(candidate: Sequence[float], best: Sequence[float], alpha: float = ANSWERS_ALPHA) -> bool:
    """Whether `candidate` answers significantly fewer items than `best` (per-item 0/1 scores of
    the same items): exact one-sided McNemar test on the items only one of them answers."""
    lost = sum(1 for c, b in zip(candidate, best, strict=True) if b > c)
    gained = sum(1 for c, b in zip(candidate, best, strict=True) if c > b)
    n = lost + gained
    if lost <= gained:
        return False
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / (1 << n) < alpha


@dataclass(frozen=True)
class Candidate:
    name: str
    allocation: BitAllocation


def swap_candidates(
    allocation: BitAllocation,
    layers: Sequence[LayerCost],
    bit_choices: Sequence[int],
    scheme: QuantScheme,
    *,
    limit: int = 4,
) -> list[BitAllocation]:
    """Up to `limit` allocations one swap away from `allocation` (one layer one choice lower,
    another one choice higher, within its budget), those whose objective rises least first."""
    if allocation.unit != AllocationUnit.layer or allocation.budget is None or limit <= 0:
        return []
    choices = sorted(bit_choices)
    budget = budget_units(layers, allocation.budget, scheme)
    by_name = {l.name: l for l in layers}
    spent = sum(layer_cost(l, allocation.bits[l.name], scheme) for l in layers)
    base = objective_of(layers, allocation.bits)
    if base is None:
        return []
    moves: list[tuple[float, int, dict[str, int]]] = []
    for down in layers:
        i = choices.index(allocation.bits[down.name])
        if i == 0:
            continue
        for up in layers:
            j = choices.index(allocation.bits[up.name])
            if up.name == down.name or j == len(choices) - 1:
                continue
            bits = {**allocation.bits, down.name: choices[i - 1], up.name: choices[j + 1]}
            cost = spent
            for name in (down.name, up.name):
                cost += layer_cost(by_name[name], bits[name], scheme)
                cost -= layer_cost(by_name[name], allocation.bits[name], scheme)
            objective = objective_of(layers, bits)
            if cost <= budget and objective is not None:
                moves.append((objective - base, len(moves), bits))
    moves.sort(key=lambda m: (m[0], m[1]))
    return [
        priced_allocation(layers, bits, allocation.budget, scheme, allocation.rule, f"{allocation.solver}, swap")
        for _, _, bits in moves[:limit]
    ]


def closed_loop(
    *,
    model: StreamedModel,
    holdout: Sequence[CalibrationRow],
    allocation: BitAllocation,
    layers: Sequence[LayerCost],
    bit_choices: Sequence[int],
    scheme: QuantScheme,
    codes: Callable[[int, int], dict[str, QuantizedWeight]],
    max_tokens: int,
    tracker: StageProgress,
    area: SpillArea,
    swaps: int = SWAPS,
    answers_check: AnswersCheck | None = None,
) -> BitAllocation:
    """The allocation to ship for one budget (see the module docstring), with its record; without
    `answers_check` (or with one that has no `generate`) the candidates are not generated with."""
    from core.streaming.evaluate import EvalVariant, teacher_forced_eval

    assert allocation.budget is not None  # closed_loop needs a budget (spec validator)
    args = (allocation.budget, list(bit_choices), scheme)
    candidates = [
        Candidate("allocation", allocation),
        Candidate("uniform", allocate_uniform_mix(layers, *args)),
        Candidate("error_only", allocate_error_only(layers, *args)),
    ]
    neighbours = swap_candidates(allocation, layers, bit_choices, scheme, limit=swaps)
    candidates += [Candidate(f"swap {k + 1}", a) for k, a in enumerate(neighbours)]
    # candidates with the same width for every linear are measured once, under the first one's name
    measured_as: dict[str, str] = {}
    first: dict[tuple[tuple[str, int], ...], str] = {}
    variants: list[EvalVariant] = []
    for c in candidates:
        linear_bits = c.allocation.bit_map.linear_bits(model.layers)
        key = tuple(sorted(linear_bits.items()))
        if key not in first:
            first[key] = c.name
            variants.append(EvalVariant(c.name, linear_bits))
        measured_as[c.name] = first[key]
    generate = answers_check.generate if answers_check is not None else None
    forced = tracker.span(0.0, 0.6 if generate is not None else 1.0)
    measured = teacher_forced_eval(model, holdout, variants, codes, max_tokens=max_tokens, tracker=forced, area=area)
    nll = {c.name: _mean(measured[measured_as[c.name]].gold_nll_items) for c in candidates}
    answered: dict[str, list[float]] = {}
    if answers_check is not None and generate is not None:
        every = {name: 16 for ref in model.layers for name in ref.linears}
        texts = generate([every] + [v.bits for v in variants], tracker.span(0.6, 1.0))
        golds = [[a for a in row.answers or [] if a.strip()] for row in answers_check.rows]
        extract = answer_extractor(golds)
        for name, answers in zip(["full_precision"] + [v.name for v in variants], texts, strict=True):
            answered[name] = [contains_match(extract(t), g) for t, g in zip(answers, golds, strict=True)]
    fewer = dict.fromkeys((c.name for c in candidates), False)
    if answered:
        top = max(candidates, key=lambda c: sum(answered[measured_as[c.name]]))
        best_items = answered[measured_as[top.name]]
        fewer = {c.name: answers_fewer(answered[measured_as[c.name]], best_items) for c in candidates}
    eligible = [c for c in candidates if not fewer[c.name]]
    shipped = min(eligible, key=lambda c: nll[c.name])  # min keeps the first of equal ones
    record: dict[str, Any] = {
        "holdout_rows": len(holdout),
        "metric": "gold_nll",
        "full_precision": _mean(measured["full_precision"].gold_nll_items),
        "answers_check": (
            {
                "rows": len(answered["full_precision"]),
                "new_tokens": HOLDOUT_NEW_TOKENS,
                "alpha": ANSWERS_ALPHA,
                "full_precision_contains": _mean(answered["full_precision"]),
            }
            if answered
            else {"skipped": (answers_check.skipped if answers_check is not None else None) or "no generation"}
        ),
        "shipped": shipped.name,
        "candidates": [
            {
                "name": c.name,
                "rule": c.allocation.rule.value,
                "effective_bits": c.allocation.effective_bits,
                "predicted_objective": _objective(c.allocation, layers),
                "measured_gold_nll": nll[c.name],
                "calibration_contains": _mean(answered[measured_as[c.name]]) if answered else None,
                "answers_fewer": fewer[c.name],
                "unit": c.allocation.unit.value,
                "bits": dict(c.allocation.bits),
            }
            for c in candidates
        ],
    }
    if shipped.name == "allocation":
        note = f"closed loop: kept the allocation (held-back gold NLL {nll['allocation']:.4f})"
    elif fewer["allocation"]:
        note = (
            f"closed loop: shipped {shipped.name} (the method's allocation answers significantly fewer "
            f"of the {len(answered['full_precision'])} calibration prompts with answers)"
        )
    else:
        note = (
            f"closed loop: shipped {shipped.name} (held-back gold NLL {nll[shipped.name]:.4f} < "
            f"{nll['allocation']:.4f} for the method's allocation, {len(holdout)} rows)"
        )
    return replace(shipped.allocation, solver=f"{shipped.allocation.solver}; {note}", closed_loop=record)


def closed_loop_stage(run: JobRun, profile: Profile) -> list[BitAllocation]:
    """The allocate stage's closed loop: every budget's allocation checked on the held-back rows."""
    from core.allocation import layer_costs_from_profile
    from core.data import tokenize_rows
    from core.job_generation import generation_skip_reason, variants_token_ids

    tracker = run.tracker("allocate")
    n = len(run.allocations)
    skipped = generation_skip_reason(run)
    check = AnswersCheck(skipped=skipped)
    if skipped is None:
        # every row with answers, the scored ones too: whether a model still answers is a property
        # of the model, and 4x the rows gives the test the power to see it (16 held-back rows could not)
        rows = [r for r in run.rows if r.answers] + list(run.holdout)
        prompts = tokenize_rows(rows, run.loaded.tokenizer, run.spec.max_tokens)
        decode = run.loaded.tokenizer.decode
        # answers per variant, across budgets: full precision and shared allocations generate once
        known: dict[tuple[tuple[str, int], ...], list[str]] = {}

        def generate(variants: list[dict[str, int]], progress: StageProgress) -> list[list[str]]:
            keys = [tuple(sorted(v.items())) for v in variants]
            missing = {k: v for k, v in zip(keys, variants, strict=True) if k not in known}
            if missing:
                ids = variants_token_ids(run, prompts, HOLDOUT_NEW_TOKENS, list(missing.values()), run.codes, progress)
                for key, answers in zip(missing, ids, strict=True):
                    known[key] = [decode(a, skip_special_tokens=True).strip() for a in answers]
            return [known[k] for k in keys]

        check = AnswersCheck(rows=rows, generate=generate)
    shipped = []
    for i, allocation in enumerate(run.allocations):
        chosen = closed_loop(
            model=run.loaded,
            holdout=run.holdout,
            allocation=allocation,
            layers=layer_costs_from_profile(profile),
            bit_choices=run.spec.bit_choices,
            scheme=run.spec.scheme,
            codes=run.codes,
            max_tokens=run.spec.max_tokens,
            tracker=tracker.span(i / n, (i + 1) / n),
            area=run.area,
            answers_check=check,
        )
        run.hooks.progress("allocate", (i + 1) / n, chosen.solver.rsplit("; ", 1)[-1])
        shipped.append(chosen)
    return shipped


def _objective(allocation: BitAllocation, layers: Sequence[LayerCost]) -> float | None:
    """The method's objective (its sensitivities or predicted loss) of a layer allocation; a
    per-linear one keeps the objective its allocator computed."""
    if allocation.unit == AllocationUnit.layer:
        return objective_of(layers, allocation.bits)
    return allocation.objective


def _mean(values: Sequence[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else float("nan")
