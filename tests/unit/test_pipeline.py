"""run_pipeline and its stages on the tiny Llama: budgets met, determinism, resume from a profile,
apply_quantized, cancellation and progress."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import core.pipeline as pipeline
from core.errors import BudgetInfeasible, Cancelled, InvalidSpec
from core.models import LoadedModel, load_model, resolve_model
from core.pipeline import (PipelineResult, QuantizedOutput, allocate_stage, apply_quantized, quantize_stage,
                           run_pipeline, score_stage)
from core.quant.primitives import dequantize_weight
from core.spec import CalibrationRow, JobSpec
from core.types import effective_bits

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a CPU shared with other jobs two
    OpenMP threads spin against each other (the same tests ran 5-10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

ROWS = [CalibrationRow(prompt=f"Task {i}: summarise the number {i * 7} in words. " + "Please. " * (i % 3))
        for i in range(10)]


def make_spec(**overrides) -> JobSpec:
    fields = dict(model="tiny-llama", method="taq", calibration=ROWS, bit_budget={"avg_bits": 6.0},
                  bit_choices=[4, 8, 16], group_size=32, reservoir_size=32, max_tokens=48, seed=0)
    fields.update(overrides)
    return JobSpec(**fields)


@pytest.fixture(scope="module")
def tiny(tiny_model_root: Path) -> LoadedModel:
    return load_model(resolve_model("tiny-llama", [tiny_model_root], {}))


@pytest.fixture(scope="module")
def result(tiny: LoadedModel) -> PipelineResult:
    return run_pipeline(make_spec(), tiny, ROWS)


def test_budget_met_and_layers_share_bits(tiny: LoadedModel, result: PipelineResult) -> None:
    assert len(result.outputs) == 1
    out = result.outputs[0]
    assert isinstance(out, QuantizedOutput) and out.budget == 6.0
    allocation = out.allocation
    assert set(allocation.bits) == {ref.name for ref in tiny.layers}
    total = sum(ref.params for ref in tiny.layers)
    achieved = sum(effective_bits(allocation.bits[ref.name], 32, False) * ref.params for ref in tiny.layers) / total
    assert achieved == pytest.approx(allocation.effective_bits) and achieved <= 6.0
    assert len(set(allocation.bits.values())) > 1  # a mixed allocation at this budget
    for ref in tiny.layers:
        bits = allocation.bits[ref.name]
        for name in ref.linears:
            if bits == 16:
                assert name not in out.weights
            else:
                q = out.weights[name]
                assert q.bits == bits and q.group_size == 32 and not q.symmetric
                assert q.codes.device.type == "cpu"
    assert [l.bits for l in result.profile.layers] == [allocation.bits[l.name] for l in result.profile.layers]
    assert set(out.weights) <= {n for ref in tiny.layers for n in ref.linears}  # never the LM head


def test_same_inputs_same_result(tiny: LoadedModel, result: PipelineResult) -> None:
    again = run_pipeline(make_spec(), tiny, ROWS)
    assert again.profile == result.profile
    assert again.outputs[0].allocation == result.outputs[0].allocation
    for name, q in result.outputs[0].weights.items():
        other = again.outputs[0].weights[name]
        assert torch.equal(q.codes, other.codes) and torch.equal(q.scale, other.scale)
        assert torch.equal(q.zero, other.zero)


def test_budget_sweep_and_given_profile_skips_scoring(tiny: LoadedModel, result: PipelineResult,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no_scoring(*args, **kwargs):
        raise AssertionError("scoring must be skipped when a profile is given")

    monkeypatch.setattr(pipeline, "score_layers", no_scoring)
    spec = make_spec(bit_budget={"avg_bits": [5.5, 9.5]})
    swept = run_pipeline(spec, tiny, ROWS, profile=result.profile.with_bits({}))
    assert [o.budget for o in swept.outputs] == [5.5, 9.5]
    assert all(o.allocation.effective_bits <= o.budget for o in swept.outputs)
    assert swept.outputs[0].allocation.effective_bits < swept.outputs[1].allocation.effective_bits
    assert all(l.bits is None for l in swept.profile.layers)  # several allocations: no single bit map


def test_profile_must_match_the_model(tiny: LoadedModel, result: PipelineResult) -> None:
    from dataclasses import replace

    wrong = replace(result.profile, layers=result.profile.layers[:2])
    with pytest.raises(InvalidSpec):
        run_pipeline(make_spec(), tiny, ROWS, profile=wrong)


def test_infeasible_budget(result: PipelineResult) -> None:
    with pytest.raises(BudgetInfeasible):
        allocate_stage(make_spec(bit_budget={"avg_bits": 4.9}), result.profile)


def test_uniform_and_paper_rules(result: PipelineResult) -> None:
    uniform = allocate_stage(make_spec(method="uniform", bit_budget={"avg_bits": [5.0, 9.0]}), result.profile)
    assert [set(a.bits.values()) for a in uniform] == [{4}, {8}]
    paper = allocate_stage(make_spec(allocation="paper", bit_budget=None), result.profile)
    assert len(paper) == 1 and paper[0].rule == "paper"
    assert sorted(paper[0].bits.values()) == [4, 4, 4, 8]
    top = max(result.profile.layers, key=lambda l: l.importance).name
    assert paper[0].bits[top] == 8


def test_apply_quantized_writes_dequantized_weights(tiny: LoadedModel, result: PipelineResult) -> None:
    model = copy.deepcopy(tiny.model)
    weights = result.outputs[0].weights
    apply_quantized(model, weights)
    for name, q in weights.items():
        module = dict(model.named_modules())[name]
        assert torch.equal(module.weight, dequantize_weight(q, torch.float32))
    untouched = [n for ref in tiny.layers for n in ref.linears if n not in weights]
    for name in untouched:
        assert torch.equal(dict(model.named_modules())[name].weight, dict(tiny.model.named_modules())[name].weight)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        a, b = tiny.model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.equal(a, b) and float((a - b).norm() / a.norm()) < 0.2


def test_max_calibration_rows_subsamples_deterministically(tiny: LoadedModel) -> None:
    spec = make_spec(max_calibration_rows=4)
    many = ROWS + [CalibrationRow(prompt=f"extra {i}") for i in range(30)]
    a = score_stage(spec, tiny, many)
    assert a == score_stage(spec, tiny, many)
    assert a.layers[0].scores["reservoir_tokens"] <= 4 * 48


def test_quantize_stage_progress_and_cancel(tiny: LoadedModel, result: PipelineResult) -> None:
    allocation = result.outputs[0].allocation
    events = []
    quantize_stage(make_spec(), tiny, allocation, progress=lambda s, f, m: events.append((s, f, m)))
    assert [s for s, _, _ in events] == ["quantize"] * 4 and events[-1][1] == 1.0
    assert all(f"model.layers.{i} " in events[i][2] for i in range(4))
    checks = []

    def cancel_second_layer() -> bool:
        checks.append(1)
        return len(checks) >= 2

    with pytest.raises(Cancelled):
        quantize_stage(make_spec(), tiny, allocation, should_cancel=cancel_second_layer)
    assert len(checks) == 2


def test_pipeline_progress_and_cancel(tiny: LoadedModel) -> None:
    events = []
    run_pipeline(make_spec(), tiny, ROWS, progress=lambda s, f, m: events.append(s))
    assert events.index("calibrate") < events.index("score") < events.index("allocate") < events.index("quantize")
    calls = []

    def cancel_at_quantize() -> bool:
        calls.append(1)
        return bool(events) and events[-1] == "allocate"

    events.clear()
    with pytest.raises(Cancelled):
        run_pipeline(make_spec(), tiny, ROWS, progress=lambda s, f, m: events.append(s),
                     should_cancel=cancel_at_quantize)
    assert "quantize" not in events
