"""taq_grad (core/scorers/taq_grad.py) on the tiny random Llama.

The streamed prediction is recomputed from its definition on the WHOLE in-memory transformers
model (autograd through the model's own forward, hooks on every linear), and compared with the
measured loss increase of the model with one layer quantized at each width (the stored codes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from pipeline_helpers import spy_layer_pass

from core.allocation import LayerCost, allocate_budget, layer_costs_from_profile, linear_units
from core.controls import allocate_error_only
from core.models import resolve_model
from core.pipeline import JobInputs, run_job
from core.quant.primitives import dequantize_weight
from core.scheme import QuantScheme
from core.scorers.common import SequencePlan
from core.scorers.taq_grad import position_weights
from core.spec import CalibrationRow, JobSpec
from core.stats import spearman
from core.streaming.checkpoints import MemoryStore, load_codes
from core.types import Profile

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

ROWS = [CalibrationRow(prompt=f"What is {i} plus {2 * i}?", answers=[str(3 * i)]) for i in range(6)] + [
    CalibrationRow(prompt="What is the capital of France?", answers=["Paris", "paris"]),
    CalibrationRow(prompt="Name a colour.", answers=["Blue"]),
]
WIDTHS = [2, 3, 4, 8]


@dataclass
class GradRun:
    profile: Profile
    plan: SequencePlan
    store: MemoryStore


def make_spec(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = dict(
        model="tiny-llama",
        method="taq_grad",
        calibration=ROWS,
        bit_budget={"avg_bits": 5.0},
        bit_choices=[*WIDTHS, 16],
        group_size=32,
        max_tokens=64,
        seed=0,
        exports=[],
    )
    fields.update(overrides)
    return JobSpec(**fields)


def grad_run(source, **overrides: Any) -> GradRun:
    store = MemoryStore()
    with spy_layer_pass() as seen:
        outputs = run_job(JobInputs(spec=make_spec(**overrides), source=source, rows=ROWS, batch_tokens=120), store)
    return GradRun(profile=outputs.profile.without_bits(), plan=seen["scorer"].sequence_plan, store=store)


@pytest.fixture(scope="module")
def source(tiny_model_root: Path):
    return resolve_model("tiny-llama", [tiny_model_root], {})


@pytest.fixture(scope="module")
def run(source) -> GradRun:
    return grad_run(source)


def task_loss(model, plan: SequencePlan) -> torch.Tensor:
    """Mean over sequences of each sequence's mean answer NLL, each sequence run alone."""
    total = torch.zeros((), dtype=torch.float64)
    for tokens, start in zip(plan.sequences, plan.starts, strict=True):
        assert start is not None
        ids = torch.tensor([tokens])
        logits = model(input_ids=ids).logits[0].float()
        logprob = torch.log_softmax(logits[start - 1 : len(tokens) - 1], dim=-1)
        nll = -logprob.gather(1, ids[0, start:, None])[:, 0]
        total = total + nll.double().mean()
    return total / len(plan.sequences)


def linears_of(model, layer: int) -> dict[str, torch.nn.Linear]:
    prefix = f"model.layers.{layer}."
    return {
        name: module
        for name, module in model.named_modules()
        if name.startswith(prefix) and isinstance(module, torch.nn.Linear)
    }


def reference_predictions(model, plan: SequencePlan, store: MemoryStore) -> dict[str, dict[int, float]]:
    """½·N·Σ (∂L/∂Y)²·(X ΔWᵀ)² per linear and width, by autograd on the whole model."""
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    handles = []
    n_layers = model.config.num_hidden_layers
    names = {name: module for l in range(n_layers) for name, module in linears_of(model, l).items()}

    for name, module in names.items():

        def record(mod, args, out, _name=name):
            inputs[_name] = args[0].detach()[0]
            out.register_hook(lambda g, n=_name: grads.__setitem__(n, g.detach()[0]))

        handles.append(module.register_forward_hook(record))
    acc = {name: dict.fromkeys(WIDTHS, 0.0) for name in names}
    deltas = {
        (name, b): dequantize_weight(q) - names[name].weight.detach()
        for l in range(n_layers)
        for b in WIDTHS
        for name, q in load_codes(store, "work/layers", l, b).items()
    }
    try:
        n = len(plan.sequences)
        for tokens, start in zip(plan.sequences, plan.starts, strict=True):
            model.zero_grad()
            ids = torch.tensor([tokens])
            logits = model(input_ids=ids).logits[0].float()
            logprob = torch.log_softmax(logits[start - 1 : len(tokens) - 1], dim=-1)
            nll = -logprob.gather(1, ids[0, start:, None])[:, 0]
            (nll.mean() / n).backward()
            for name in names:
                for b in WIDTHS:
                    dy = inputs[name] @ deltas[(name, b)].T
                    acc[name][b] += float((grads[name].square() * dy.square()).sum(dtype=torch.float64))
    finally:
        for h in handles:
            h.remove()
        model.zero_grad()
    return {name: {b: 0.5 * n * v for b, v in by.items()} for name, by in acc.items()}


def test_streamed_prediction_is_the_whole_model_fisher(tiny, run: GradRun) -> None:
    model = tiny[0]
    reference = reference_predictions(model, run.plan, run.store)
    for layer in run.profile.layers:
        for linear in layer.linears:
            for b in WIDTHS:
                want = reference[linear.name][b]
                assert linear.predicted_loss[b] == pytest.approx(want, rel=2e-3, abs=1e-12), (linear.name, b)
        for b in WIDTHS:
            assert layer.predicted_loss[b] == pytest.approx(sum(l.predicted_loss[b] for l in layer.linears))
        assert layer.importance == layer.predicted_loss[2]
    with torch.no_grad():
        fp_loss = float(task_loss(model, run.plan))
    assert all(layer.scores["fp_nll"] == pytest.approx(fp_loss, rel=1e-4) for layer in run.profile.layers)


def test_prediction_ranks_the_measured_loss_increase(tiny, run: GradRun) -> None:
    """Each layer alone at each width: the predicted increase ranks the measured one (Spearman ≥ 0.8
    over layers × widths; 0.83 here). On this random model the 8-bit changes are within float32
    noise of the loss and the 2-bit ones exceed the second-order regime (measured ≈ 10× predicted),
    so only the ranking is asserted."""
    model = tiny[0]
    with torch.no_grad():
        base = float(task_loss(model, run.plan))
        predicted, measured = [], []
        for layer in run.profile.layers:
            linears = linears_of(model, layer.index)
            for b in WIDTHS:
                saved = {n: m.weight.detach().clone() for n, m in linears.items()}
                for n, q in load_codes(run.store, "work/layers", layer.index, b).items():
                    linears[n].weight.copy_(dequantize_weight(q))
                measured.append(float(task_loss(model, run.plan)) - base)
                for n, w in saved.items():
                    linears[n].weight.copy_(w)
                predicted.append(layer.predicted_loss[b])
    assert spearman(predicted, measured) >= 0.8, list(zip(predicted, measured, strict=True))
    # wider formats never predict more damage than narrower ones of the same layer
    for layer in run.profile.layers:
        assert [layer.predicted_loss[b] for b in WIDTHS] == sorted(
            (layer.predicted_loss[b] for b in WIDTHS), reverse=True
        )


def test_position_weights_average_sequences_then_tokens() -> None:
    seq = torch.tensor([0, 0, 0, 1, 3, 3])
    w = position_weights(seq, 4)
    assert w.tolist() == pytest.approx([1 / 9, 1 / 9, 1 / 9, 1 / 3, 1 / 6, 1 / 6])
    assert float(w.sum()) == pytest.approx(1.0)


def test_allocation_minimises_the_prediction(run: GradRun) -> None:
    profile = run.profile
    layers = layer_costs_from_profile(profile)
    assert all(l.predicted == profile.layers[i].predicted_loss for i, l in enumerate(layers))
    chosen = allocate_budget(profile, 5.0, [*WIDTHS, 16], QuantScheme(32))
    best = chosen.objective
    assert best is not None
    assert best == pytest.approx(
        sum(profile.layers[i].predicted_loss.get(chosen.bits[l.name], 0.0) for i, l in enumerate(profile.layers))
    )
    control = allocate_error_only(profile, 5.0, [*WIDTHS, 16], QuantScheme(32))
    predicted_control = sum(layer.predicted_loss.get(control.bits[layer.name], 0.0) for layer in profile.layers)
    assert best <= predicted_control + 1e-12
    units = linear_units(profile)
    for unit in units:
        assert unit.cost.predicted is not None
        members = [l for layer in profile.layers for l in layer.linears if l.name in unit.linears]
        for b in WIDTHS:
            assert unit.cost.predicted[b] == pytest.approx(sum(m.predicted_loss[b] for m in members))


def test_profile_json_round_trips_the_prediction(run: GradRun) -> None:
    data = run.profile.to_dict()
    assert "predicted_loss" in data["layers"][0] and "predicted_loss" in data["layers"][0]["linears"][0]
    assert Profile.from_dict(data) == run.profile
    plain = Profile.from_dict(data).without_bits()
    for layer in data["layers"]:
        layer.pop("predicted_loss")
        for linear in layer["linears"]:
            linear.pop("predicted_loss")
    stripped = Profile.from_dict(data)
    assert all(not l.predicted_loss for l in stripped.layers)
    assert "predicted_loss" not in stripped.to_dict()["layers"][0]
    assert plain.layers[0].predicted_loss == run.profile.layers[0].predicted_loss


def test_same_inputs_same_profile(source, run: GradRun) -> None:
    again = grad_run(source)
    assert again.profile == run.profile
    assert math.isfinite(sum(l.importance for l in again.profile.layers))


def test_knapsack_follows_the_prediction_not_sensitivity_times_error() -> None:
    """Two equal layers, budget for one at 8 bits: s·e says raise `a`, the prediction says `b`.
    The allocator follows the prediction when it is present; error_only drops it."""
    shapes = ((64, 64),)
    a = LayerCost("a", 4096, 1.0, {4: 0.5, 8: 0.01}, shapes, {4: 0.1, 8: 0.09})
    b = LayerCost("b", 4096, 1.0, {4: 0.2, 8: 0.01}, shapes, {4: 0.3, 8: 0.01})
    budget = 6.5  # 4-bit everywhere plus one layer at 8 (group 64, asymmetric)
    chosen = allocate_budget([a, b], budget, [4, 8], QuantScheme(64))
    assert chosen.bits == {"a": 4, "b": 8}
    assert chosen.objective == pytest.approx(0.1 + 0.01)
    plain = allocate_budget([replace(a, predicted=None), replace(b, predicted=None)], budget, [4, 8], QuantScheme(64))
    assert plain.bits == {"a": 8, "b": 4}
    assert allocate_error_only([a, b], budget, [4, 8], QuantScheme(64)).bits == {"a": 8, "b": 4}
    with pytest.raises(ValueError, match="predicted has no entry for 8 bits"):
        allocate_budget([LayerCost("c", 4096, 1.0, {4: 0.5, 8: 0.1}, shapes, {4: 0.1})], 8.5, [4, 8], QuantScheme(64))
