"""The task-agnostic controls (core/controls.py) and the stored-bits accounting they share with the
allocator: same budget, same effective bits where the menu allows, seeded, padded groups counted."""

from __future__ import annotations

from fractions import Fraction

import pytest

from core.allocation import LayerCost, allocate_budget, effective_of, layer_cost, linear_units
from core.controls import allocate_error_only, allocate_random, allocate_uniform_mix, spread
from core.errors import BudgetInfeasible
from core.pipeline import allocate_stage
from core.scheme import QuantScheme, effective_bits, stored_bits
from core.spec import JobSpec
from core.types import LayerProfile, LinearProfile, Profile

pytestmark = pytest.mark.unit

# SmolLM2-135M's decoder linears: q, k, v, o, gate, up, down as [out, in]
SMOLLM2_SHAPES = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))


def smollm_layers(n: int = 30, sensitivities=None) -> list[LayerCost]:
    params = sum(o * i for o, i in SMOLLM2_SHAPES)
    sens = sensitivities or [1.0] * n
    return [
        LayerCost(f"model.layers.{i}", params, sens[i], {4: 0.1 + i / 100, 8: 0.01, 16: 0.0}, SMOLLM2_SHAPES)
        for i in range(n)
    ]


def one_upgrade(layers: list[LayerCost]) -> float:
    """Effective bits one layer moving from 4 to 8 bits adds (g128, asymmetric)."""
    all_four = {l.name: 4 for l in layers}
    return float(
        effective_of(layers, {**all_four, layers[0].name: 8}, QuantScheme(128))
        - effective_of(layers, all_four, QuantScheme(128))
    )


def test_partial_groups_are_counted() -> None:
    # 576 inputs in groups of 128 store 5 groups per row: 4 + 5·24/576 bits per weight, not 4 + 24/128
    assert stored_bits(4, 128, False, (10, 576)) == 10 * (576 * 4 + 5 * 24)
    assert effective_bits(4, 128, False, 576) == pytest.approx(4 + 5 * 24 / 576)
    assert effective_bits(4, 128, True, 576) == pytest.approx(4 + 5 * 16 / 576)
    assert effective_bits(4, 128, False, 512) == effective_bits(4, 128, False) == 4 + 24 / 128
    assert stored_bits(16, 128, False, (3, 100)) == 3 * 100 * 16
    # the SmolLM2 mix: every in=576 linear pads, down_proj (1536 = 12·128) does not
    layer = smollm_layers(1)[0]
    eff = effective_of([layer], {layer.name: 4}, QuantScheme(128))
    assert eff == Fraction(sum(stored_bits(4, 128, False, s) for s in SMOLLM2_SHAPES), layer.params)
    assert float(eff) == pytest.approx(4.2031, abs=1e-4)
    # without shapes the weights are counted as whole groups (old profiles)
    bare = LayerCost("a", 1024, 1.0, {4: 0.1})
    assert layer_cost(bare, 4, QuantScheme(128)) == 1024 * (4 * 128 + 24)


def test_budget_allocation_never_overspends_with_padding() -> None:
    layers = smollm_layers(6)
    whole_groups = 4 + 24 / 128  # what the budget would have allowed if padding were ignored
    with pytest.raises(BudgetInfeasible):
        allocate_budget(layers, whole_groups, [4, 8], QuantScheme(128))
    got = allocate_budget(layers, 4.21, [4, 8], QuantScheme(128))
    assert set(got.bits.values()) == {4} and got.effective_bits <= 4.21


def test_profile_linears_carry_shapes_into_costs() -> None:
    linears = [
        LinearProfile(f"model.layers.0.l{j}", o * i, {4: 0.1, 8: 0.01}, in_features=i)
        for j, (o, i) in enumerate(SMOLLM2_SHAPES)
    ]
    params = sum(l.params for l in linears)
    profile = Profile(
        "m", "taq", [LayerProfile(0, "model.layers.0", params, {}, 0.0, 1.0, {4: 0.1, 8: 0.01}, linears=linears)]
    )
    assert LinearProfile.from_dict(linears[0].to_dict()) == linears[0]
    spec = JobSpec(
        model="m", method="taq", calibration=[{"prompt": "x"}], bit_budget={"avg_bits": 4.21}, bit_choices=[4, 8]
    )
    (allocation,) = allocate_stage(spec, profile)
    assert allocation.effective_bits == pytest.approx(4.2031, abs=1e-4)
    # per-linear units carry their members' shapes too
    units = linear_units(profile)
    assert all(u.cost.shapes for u in units)


def test_error_only_is_the_knapsack_without_sensitivities() -> None:
    layers = smollm_layers(8, sensitivities=[0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0])
    budget = 5.0
    control = allocate_error_only(layers, budget, [4, 8], QuantScheme(128))
    flat = allocate_budget(
        [LayerCost(l.name, l.params, 1.0, l.quant_error, l.shapes) for l in layers], budget, [4, 8], QuantScheme(128)
    )
    assert control.bits == flat.bits and control.rule == "error_only"
    assert control.effective_bits <= budget
    # the largest 4-bit errors (the last layers here) are raised, whatever the sensitivities say
    raised = [n for n, b in control.bits.items() if b == 8]
    assert raised == [f"model.layers.{i}" for i in range(8 - len(raised), 8)]
    method = allocate_budget(layers, budget, [4, 8], QuantScheme(128))
    assert method.bits["model.layers.1"] == 8 and method.bits != control.bits


def test_random_is_seeded_and_spends_like_the_method() -> None:
    layers = smollm_layers(30)
    method = allocate_budget(layers, 4.6, [4, 8, 16], QuantScheme(128))
    a = allocate_random(layers, 4.6, [4, 8, 16], QuantScheme(128), seed=3)
    assert a == allocate_random(layers, 4.6, [4, 8, 16], QuantScheme(128), seed=3)
    b = allocate_random(layers, 4.6, [4, 8, 16], QuantScheme(128), seed=4)
    assert a.bits != b.bits and a.rule == "random"
    for control in (a, b):
        assert control.effective_bits <= 4.6
        # equal layers: within one layer's smallest step of the method's spend
        assert control.effective_bits > method.effective_bits - 2 * one_upgrade(layers)
    with pytest.raises(BudgetInfeasible):
        allocate_random(layers, 4.0, [4, 8], QuantScheme(128))


def test_uniform_mix_spends_the_budget_evenly() -> None:
    layers = smollm_layers(30)
    got = allocate_uniform_mix(layers, 5.0, [4, 8, 16], QuantScheme(128))
    eights = [i for i in range(30) if got.bits[f"model.layers.{i}"] == 8]
    assert set(got.bits.values()) == {4, 8} and got.effective_bits <= 5.0
    # one more layer at 8 would overspend: it is the nearest feasible equal-bits uniform
    assert got.effective_bits + one_upgrade(layers) > 5.0
    assert eights == spread(len(eights), 30) and eights[0] == 0 and eights[-1] == 29
    assert "uniform-mix" in got.solver and got.rule == "uniform"
    # a budget one width pays for everywhere is plain uniform
    assert set(allocate_uniform_mix(layers, 16.0, [4, 8, 16], QuantScheme(128)).bits.values()) == {16}


@pytest.mark.parametrize(
    "count, total, expected",
    [(0, 5, []), (1, 5, [2]), (2, 5, [0, 4]), (3, 5, [0, 2, 4]), (5, 5, [0, 1, 2, 3, 4]), (7, 5, [0, 1, 2, 3, 4])],
)
def test_spread(count: int, total: int, expected: list[int]) -> None:
    assert spread(count, total) == expected


def test_spec_allocation_controls_run_through_allocate_stage() -> None:
    layers = smollm_layers(4)
    profile = Profile(
        "m",
        "taq",
        [LayerProfile(i, l.name, l.params, {}, 0.0, l.sensitivity, l.quant_error) for i, l in enumerate(layers)],
    )
    for rule in ("error_only", "random"):
        spec = JobSpec(
            model="m",
            method="taq",
            calibration=[{"prompt": "x"}],
            bit_budget={"avg_bits": [5.0, 6.0]},
            bit_choices=[4, 8],
            allocation=rule,
            seed=7,
        )
        allocations = allocate_stage(spec, profile)
        assert [a.rule for a in allocations] == [rule, rule]
        assert all(a.effective_bits <= a.budget for a in allocations)
    with pytest.raises(ValueError, match="needs 'bit_budget'"):
        JobSpec(model="m", method="taq", calibration=[{"prompt": "x"}], allocation="random")
