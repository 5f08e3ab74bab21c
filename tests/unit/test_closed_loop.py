"""closed_loop (core/closed_loop.py): held-back rows, one-swap neighbours, and the shipped
allocation measured independently on the whole in-memory model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from core.allocation import LayerCost, allocate_budget, budget_units, layer_cost, objective_of
from core.closed_loop import HOLDOUT_NEW_TOKENS, MIN_HOLDOUT, SWAPS, answers_fewer, split_holdout, swap_candidates
from core.data import encode_text, tokenize_rows
from core.errors import DataError
from core.models import resolve_model
from core.pipeline import JobInputs, run_job
from core.quant.primitives import dequantize_weight
from core.scheme import QuantScheme
from core.spec import CalibrationRow, JobSpec
from core.streaming.checkpoints import MemoryStore, load_codes
from core.types import BitAllocation

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

ROWS = [CalibrationRow(prompt=f"What is {i} plus {2 * i}?", answers=[str(3 * i)]) for i in range(10)] + [
    CalibrationRow(prompt="Say something."),
    CalibrationRow(prompt="What is the capital of France?", answers=["Paris", "paris"]),
]


def spec(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = dict(
        model="tiny-llama",
        method="taq_grad",
        calibration=[r for r in ROWS if r.answers],
        bit_budget={"avg_bits": 6.8},  # two of the four layers at 8 bits (4.75 / 8.75 each)
        bit_choices=[4, 8, 16],
        group_size=32,
        max_tokens=64,
        seed=0,
        exports=[],
        closed_loop=True,
    )
    fields.update(overrides)
    return JobSpec(**fields)


def test_holdout_is_a_seeded_quarter_of_the_answered_rows() -> None:
    scored, held = split_holdout(ROWS, seed=0)
    assert len(held) == MIN_HOLDOUT == 4  # a quarter of 11 answered rows is 3: at least 4
    assert all(r.answers for r in held)
    assert ROWS[10] in scored and len(scored) + len(held) == len(ROWS)
    assert not set(map(id, scored)) & set(map(id, held))
    assert split_holdout(ROWS, seed=0) == (scored, held)
    assert split_holdout(ROWS, seed=1)[1] != held
    with pytest.raises(DataError, match="needs at least one more"):
        split_holdout(ROWS[:4], seed=0)


def test_spec_refuses_closed_loop_where_it_checks_nothing() -> None:
    with pytest.raises(ValidationError, match="closed_loop checks"):
        spec(method="uniform")
    with pytest.raises(ValidationError, match="closed_loop checks"):
        spec(allocation="error_only")
    with pytest.raises(ValidationError, match="cannot reuse a profile"):
        spec(profile_from_job_id="job_x")


def _layers() -> list[LayerCost]:
    shapes = ((64, 64),)
    sens = [1.0, 3.0, 0.5, 2.0]
    return [LayerCost(f"l{i}", 4096, s, {4: 0.3, 8: 0.01}, shapes) for i, s in enumerate(sens)]


def test_swaps_stay_in_budget_move_one_pair_and_rise_least_first() -> None:
    layers = _layers()
    base = allocate_budget(layers, 6.4, [4, 8], QuantScheme(64))
    assert sorted(base.bits.values()) == [4, 4, 8, 8]
    swaps = swap_candidates(base, layers, [4, 8], QuantScheme(64), limit=10)
    assert len(swaps) == 4  # two layers at 8 x two at 4
    budget = budget_units(layers, 6.4, QuantScheme(64))
    rises = []
    for s in swaps:
        changed = {k for k in s.bits if s.bits[k] != base.bits[k]}
        assert len(changed) == 2 and sorted(s.bits.values()) == [4, 4, 8, 8]
        assert sum(layer_cost(l, s.bits[l.name], QuantScheme(64)) for l in layers) <= budget
        rises.append(objective_of(layers, s.bits) - base.objective)
    assert rises == sorted(rises) and rises[0] > 0
    assert len(swap_candidates(base, layers, [4, 8], QuantScheme(64), limit=2)) == 2


def _gold_nll(model, tokenizer, rows: list[CalibrationRow], max_tokens: int) -> float:
    """Mean over rows of the best alias's mean answer-token NLL, teacher-forced on the whole model."""
    prompts = tokenize_rows(rows, tokenizer, max_tokens)
    values = []
    with torch.no_grad():
        for prompt, row in zip(prompts, rows, strict=True):
            best = float("inf")
            for answer in row.answers or []:
                tokens = list(prompt) + encode_text(answer, tokenizer, templated=True)[:32]
                ids = torch.tensor([tokens])
                logprob = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                gold = ids[0, len(prompt) :]
                nll = -logprob[len(prompt) - 1 : len(tokens) - 1].gather(1, gold[:, None])[:, 0].double().mean()
                best = min(best, float(nll))
            values.append(best)
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def shipped(tiny_model_root: Path) -> tuple[JobSpec, BitAllocation, MemoryStore]:
    job = spec()
    store = MemoryStore()
    source = resolve_model("tiny-llama", [tiny_model_root], {})
    outputs = run_job(JobInputs(spec=job, source=source, rows=list(job.calibration or [])), store)
    stored = json.loads(store.get_bytes("artifacts/bitmap.json"))
    assert BitAllocation.from_dict(stored["budgets"][0]) == outputs.allocations[0]
    return job, outputs.allocations[0], store


def test_every_candidate_is_measured_as_the_whole_model_measures_it(tiny, shipped) -> None:
    job, allocation, store = shipped
    record = allocation.closed_loop
    assert record is not None and record["metric"] == "gold_nll" and record["holdout_rows"] == MIN_HOLDOUT
    names = [c["name"] for c in record["candidates"]]
    assert names == ["allocation", "uniform", "error_only"]  # swaps are off by default (SWAPS = 0)
    model, tokenizer = tiny
    _, held = split_holdout(list(job.calibration or []), job.seed)
    assert record["full_precision"] == pytest.approx(_gold_nll(model, tokenizer, held, job.max_tokens), rel=1e-4)
    assert record["candidates"][0]["bits"] != record["candidates"][1]["bits"]
    assert SWAPS == 0
    for candidate in record["candidates"]:
        assert candidate["unit"] == "layer"
        bits = candidate["bits"]
        saved = {}
        with torch.no_grad():
            for layer_index in range(model.config.num_hidden_layers):
                width = bits[f"model.layers.{layer_index}"]
                if width < 16:
                    for linear, q in load_codes(store, "work/layers", layer_index, width).items():
                        weight = model.get_submodule(linear).weight
                        saved[linear] = weight.detach().clone()
                        weight.copy_(dequantize_weight(q))
            measured = _gold_nll(model, tokenizer, held, job.max_tokens)
            for linear, weight in saved.items():
                model.get_submodule(linear).weight.copy_(weight)
        assert candidate["measured_gold_nll"] == pytest.approx(measured, rel=1e-4), candidate["name"]
    # generation fits (no memory limit): every candidate answered the held-back prompts
    check = record["answers_check"]
    assert check["new_tokens"] == HOLDOUT_NEW_TOKENS and 0.0 <= check["full_precision_contains"] <= 1.0
    assert check["rows"] == len([r for r in job.calibration or [] if r.answers])  # scored and held back
    assert all(0.0 <= c["calibration_contains"] <= 1.0 for c in record["candidates"])
    assert not all(c["answers_fewer"] for c in record["candidates"])
    best = min((c for c in record["candidates"] if not c["answers_fewer"]), key=lambda c: c["measured_gold_nll"])
    assert record["shipped"] == best["name"]
    assert dict(allocation.bits) == best["bits"]
    assert "closed loop:" in allocation.solver and allocation.effective_bits <= 6.8


def test_a_candidate_that_answers_significantly_fewer_is_flagged() -> None:
    """Exact one-sided McNemar: p = P(Binomial(lost + gained, 1/2) >= lost) < 0.05."""
    best = [1.0] * 8
    assert answers_fewer([0.0] * 5 + [1.0] * 3, best)  # 5 lost, 0 gained: p = 1/32
    assert not answers_fewer([0.0] * 4 + [1.0] * 4, best)  # 4 lost: p = 1/16
    six_one = [0.0] * 6 + [1.0, 1.0]
    assert not answers_fewer(six_one, [1.0] * 7 + [0.0])  # 6 lost, 1 gained: p = 8/128
    assert answers_fewer([0.0] * 7 + [1.0], [1.0] * 7 + [1.0])  # 7 lost: p = 1/128
    assert not answers_fewer(best, best) and not answers_fewer([1.0, 0.0], [0.0, 1.0])


def test_a_budget_sweep_checks_every_budget_with_the_same_answers(tiny_model_root: Path) -> None:
    """Answers are generated per distinct variant across the sweep's budgets: full precision's
    (and any allocation two budgets share) are the same generation in both records."""
    job = spec(bit_budget={"avg_bits": [6.8, 5.0]})
    source = resolve_model("tiny-llama", [tiny_model_root], {})
    outputs = run_job(JobInputs(spec=job, source=source, rows=list(job.calibration or [])), MemoryStore())
    first, second = (a.closed_loop for a in outputs.allocations)
    assert first is not None and second is not None
    assert first["answers_check"] == second["answers_check"]
    assert first["answers_check"]["rows"] == len(job.calibration or [])
    for record in (first, second):
        best = min((c for c in record["candidates"] if not c["answers_fewer"]), key=lambda c: c["measured_gold_nll"])
        assert record["shipped"] == best["name"]
