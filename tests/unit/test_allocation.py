"""core.allocation: exact budget solver vs brute force, grid fallback, infeasibility, uniform, paper."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from core.allocation import (
    EXACT_SOLVER,
    LayerCost,
    allocate_budget,
    allocate_uniform,
    layer_costs_from_profile,
)
from core.allocation_paper import allocate_paper
from core.errors import BudgetInfeasible, InvalidSpec
from core.scheme import QuantScheme, effective_bits
from core.spec import Method
from core.types import LayerProfile, Profile

pytestmark = pytest.mark.unit


def unit_cost(bits: int, g: int, symmetric: bool) -> int:
    return 16 * g if bits == 16 else bits * g + (16 if symmetric else 24)  # fp16 scale, int8 zero


def brute_force(layers: list[LayerCost], avg_bits: float, choices: list[int], g: int, symmetric: bool):
    """Every combination; same key as documented: (objective, secondary, cost, more bits on later layers)."""
    budget = Fraction(repr(avg_bits)) * g * sum(l.params for l in layers)
    best = None
    for combo in itertools.product(sorted(choices), repeat=len(layers)):
        cost = sum(l.params * unit_cost(b, g, symmetric) for l, b in zip(layers, combo))
        if cost > budget:
            continue
        prim = sec = 0.0
        for l, b in zip(layers, combo):  # same summation order as the solver
            e = l.quant_error.get(b, 0.0)
            prim += l.sensitivity * e
            sec += l.params * e
        key = (prim, sec, cost, tuple(-b for b in reversed(combo)))
        if best is None or key < best[0]:
            best = (key, combo)
    return best


def random_case(rng: random.Random, dyadic: bool = False):
    """Random problem; `dyadic` draws errors in eighths and sensitivities in {0, 1, 2} so that float
    sums are exact and many allocations tie exactly, exercising the tie-breaks."""
    n_layers = rng.randint(1, 6)
    choices = sorted(rng.sample([2, 3, 4, 8, 16], rng.randint(1, 4)))
    g = rng.choice([32, 64, 128])
    symmetric = rng.random() < 0.5
    layers = []
    for i in range(n_layers):
        draw = (lambda: rng.randint(0, 8) / 8) if dyadic else rng.random
        errs = sorted((draw() for _ in choices), reverse=True)  # monotone decreasing in bits
        quant_error = dict(zip(choices, errs))
        if 16 in quant_error and rng.random() < 0.5:
            del quant_error[16]  # absent 16 means 0
        sensitivity = 0.0 if rng.random() < 0.2 else rng.random() * 3
        params = rng.randint(1, 5000)
        if dyadic:
            sensitivity = float(rng.randint(0, 2))
            params = rng.choice([100, 200, 300])
        layers.append(LayerCost(f"model.layers.{i}", params, sensitivity, quant_error))
    lo = effective_bits(choices[0], g, symmetric)
    hi = effective_bits(choices[-1], g, symmetric)
    avg_bits = round(rng.uniform(lo - 0.3, hi + 0.3), rng.choice([1, 2, 3]))
    return layers, avg_bits, choices, g, symmetric


@pytest.mark.parametrize("dyadic", [False, True])
def test_exact_solver_matches_brute_force_on_random_cases(dyadic: bool) -> None:
    rng = random.Random(1234)
    feasible = infeasible = 0
    for _ in range(250):
        layers, avg_bits, choices, g, symmetric = random_case(rng, dyadic)
        expected = brute_force(layers, avg_bits, choices, g, symmetric)
        if expected is None:
            infeasible += 1
            with pytest.raises(BudgetInfeasible):
                allocate_budget(layers, avg_bits, choices, QuantScheme(g, symmetric))
            continue
        feasible += 1
        got = allocate_budget(layers, avg_bits, choices, QuantScheme(g, symmetric))
        (prim, _sec, cost, _), combo = expected
        assert got.bits == {l.name: b for l, b in zip(layers, combo)}
        assert got.objective == prim
        total = sum(l.params for l in layers)
        assert got.effective_bits == float(Fraction(cost, g * total))
        assert got.effective_bits <= avg_bits
        assert got.solver == EXACT_SOLVER and got.rule == "budget" and got.budget == avg_bits
    assert feasible > 150 and infeasible > 10  # both branches exercised


def test_grid_fallback_meets_budget_and_is_exact_at_full_resolution() -> None:
    rng = random.Random(7)
    layers = [
        LayerCost(
            f"l{i}",
            rng.randint(100, 100_000),
            rng.random(),
            {2: 0.5 + rng.random(), 4: 0.1 + rng.random() / 10, 8: rng.random() / 100},
        )
        for i in range(12)
    ]
    choices, g, sym, avg = [2, 4, 8, 16], 64, False, 4.7
    exact = allocate_budget(layers, avg, choices, QuantScheme(g, sym))
    assert exact.solver == EXACT_SOLVER
    coarse = allocate_budget(layers, avg, choices, QuantScheme(g, sym), max_states=2, grid_steps=50)
    assert coarse.solver == "grid-dp(steps=50, costs rounded up)"
    assert coarse.effective_bits <= avg and coarse.objective >= exact.objective
    # on a grid as fine as the exact slack, rounding is the identity: same answer as the exact DP
    total = sum(l.params for l in layers)
    slack = math.floor(Fraction("4.7") * g * total) - total * unit_cost(2, g, sym)
    full = allocate_budget(layers, avg, choices, QuantScheme(g, sym), max_states=2, grid_steps=slack)
    assert full.solver.startswith("grid-dp") and full.bits == exact.bits
    assert full.objective == exact.objective


def layers_equal(n: int, errors: dict[int, float], sensitivity: float = 1.0, params: int = 1000) -> list[LayerCost]:
    return [LayerCost(f"model.layers.{i}", params, sensitivity, dict(errors)) for i in range(n)]


def test_infeasible_budget_states_smallest_feasible_avg_bits() -> None:
    layers = layers_equal(3, {4: 0.1, 8: 0.01})
    with pytest.raises(BudgetInfeasible) as info:
        allocate_budget(layers, 4.1, [4, 8, 16], QuantScheme(128))
    assert info.value.details["min_avg_bits"] == 4.1875
    assert info.value.code == "budget_infeasible"
    assert "4.1875" in info.value.message and "avg_bits=4.1" in info.value.message
    # a group size whose overhead is not a short decimal is shown rounded UP (still feasible)
    with pytest.raises(BudgetInfeasible) as info:
        allocate_budget(layers, 4.2, [4, 8], QuantScheme(112))
    assert info.value.details["min_avg_bits"] == 4 + 24 / 112
    assert "4.2143" in info.value.message
    assert allocate_budget(layers, 4.2143, [4, 8], QuantScheme(112)).bits == {l.name: 4 for l in layers}


def test_budget_is_the_decimal_the_user_wrote() -> None:
    # (311·536 + 9·1048) / (320·128) is exactly 4.3, while the float 4.3 is slightly below 43/10
    layers = [LayerCost("a", 311, 0.0, {4: 0.1, 8: 0.0}), LayerCost("b", 9, 1.0, {4: 0.1, 8: 0.0})]
    assert Fraction(4.3) < Fraction(43, 10)
    got = allocate_budget(layers, 4.3, [4, 8], QuantScheme(128))
    assert got.bits == {"a": 4, "b": 8}
    assert got.effective_bits == 4.3 and got.objective == 0.0


def test_budget_boundary_and_all_at_highest() -> None:
    layers = layers_equal(4, {4: 0.2, 8: 0.01, 16: 0.0})
    at_min = allocate_budget(layers, 4.1875, [4, 8, 16], QuantScheme(128))
    assert set(at_min.bits.values()) == {4} and at_min.effective_bits == 4.1875
    rich = allocate_budget(layers, 16.0, [4, 8, 16], QuantScheme(128))
    assert set(rich.bits.values()) == {16} and rich.effective_bits == 16.0 and rich.objective == 0.0


def test_sensitivity_decides_who_gets_precision() -> None:
    errors = {4: 0.1, 8: 0.01}
    layers = [LayerCost(f"model.layers.{i}", 1000, s, dict(errors)) for i, s in enumerate([0.1, 5.0, 0.2, 3.0])]
    # room for two upgrades: (2·8.1875 + 2·4.1875) / 4 = 6.1875
    got = allocate_budget(layers, 6.1875, [4, 8], QuantScheme(128))
    assert got.bits == {"model.layers.0": 4, "model.layers.1": 8, "model.layers.2": 4, "model.layers.3": 8}
    assert got.effective_bits == 6.1875
    assert got.objective == pytest.approx(0.1 * 0.1 + 5.0 * 0.01 + 0.2 * 0.1 + 3.0 * 0.01, rel=1e-12)


def test_zero_sensitivities_still_spend_the_budget_on_precision() -> None:
    # all sensitivities 0: the objective ties everywhere; the size-weighted error picks the upgrades
    layers = [
        LayerCost("big", 3000, 0.0, {4: 0.1, 8: 0.01}),
        LayerCost("small", 1000, 0.0, {4: 0.1, 8: 0.01}),
        LayerCost("bad", 1000, 0.0, {4: 0.9, 8: 0.01}),
    ]
    got = allocate_budget(layers, 6.0, [4, 8], QuantScheme(128))
    assert got.bits == {"big": 4, "small": 8, "bad": 8}
    assert got.objective == 0.0
    # errors equal across widths: nothing to gain, the cheapest allocation wins
    flat = [LayerCost(f"l{i}", 1000, 0.0, {4: 0.1, 8: 0.1}) for i in range(3)]
    assert set(allocate_budget(flat, 8.25, [4, 8], QuantScheme(128)).bits.values()) == {4}


def test_zero_sensitivity_layers_get_leftover_budget_after_weighted_ones() -> None:
    layers = [LayerCost("hot", 1000, 2.0, {4: 0.1, 8: 0.01}), LayerCost("cold", 1000, 0.0, {4: 0.1, 8: 0.01})]
    assert allocate_budget(layers, 6.25, [4, 8], QuantScheme(128)).bits == {"hot": 8, "cold": 4}
    assert allocate_budget(layers, 8.25, [4, 8], QuantScheme(128)).bits == {"hot": 8, "cold": 8}


def test_exact_ties_give_later_layers_more_bits_and_are_deterministic() -> None:
    layers = layers_equal(3, {4: 0.5, 8: 0.25})  # dyadic: every order sums to the same float
    first = allocate_budget(layers, 5.6, [4, 8], QuantScheme(128))  # (8.25 + 2·4.25) / 3 = 5.583: one upgrade
    assert first.bits == {"model.layers.0": 4, "model.layers.1": 4, "model.layers.2": 8}
    assert allocate_budget(layers, 5.6, [4, 8], QuantScheme(128)) == first


def test_missing_16_means_zero_error_and_other_missing_raise() -> None:
    layers = [LayerCost("a", 10, 1.0, {4: 0.5})]
    assert allocate_budget(layers, 16, [4, 16], QuantScheme(128, True)).bits == {"a": 16}
    with pytest.raises(ValueError, match="no entry for 8 bits"):
        allocate_budget(layers, 16, [4, 8], QuantScheme(128, True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bit_choices": []}, "empty"),
        ({"bit_choices": [4, 9]}, "not allowed"),
        ({"avg_bits": float("nan")}, "finite"),
        ({"layers": []}, "no layers"),
        ({"layers": [LayerCost("a", 10, -1.0, {4: 0.1})]}, "sensitivity"),
        ({"layers": [LayerCost("a", 0, 1.0, {4: 0.1})]}, "params"),
        ({"layers": [LayerCost("a", 1, 1.0, {4: 0.1}), LayerCost("a", 1, 1.0, {4: 0.1})]}, "duplicate"),
        ({"layers": [LayerCost("a", 1, 1.0, {4: float("inf")})]}, "quant_error"),
    ],
)
def test_invalid_inputs_raise(kwargs: dict, match: str) -> None:
    args = {
        "layers": [LayerCost("a", 10, 1.0, {4: 0.1})],
        "avg_bits": 8.0,
        "bit_choices": [4],
        "scheme": QuantScheme(128),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        allocate_budget(**args)


def test_scheme_refuses_a_bad_grid() -> None:
    for bad in (0, -32, True, 64.0):
        with pytest.raises(ValueError, match="group_size"):
            QuantScheme(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="asymmetric"):
        QuantScheme(32, symmetric=True, float_zero=True)
    assert QuantScheme(128).describe() == "group_size 128, asymmetric"
    assert QuantScheme(32, float_zero=True).describe() == "group_size 32, asymmetric, float zero points"


# ------------------------------------------------------------------------------ uniform


def profile(importances: list[float], params: int = 1000, method: str = "taq") -> Profile:
    return Profile(
        "tiny",
        method,
        [
            LayerProfile(
                index=i,
                name=f"model.layers.{i}",
                params=params,
                scores={},
                importance=imp,
                sensitivity=1.0,
                quant_error={4: 0.1, 8: 0.01},
            )
            for i, imp in enumerate(importances)
        ],
    )


@pytest.mark.parametrize(
    "avg_bits, symmetric, expected, eff",
    [
        (4.5, False, 4, 4.1875),
        (8.1875, False, 8, 8.1875),
        (8.1, False, 4, 4.1875),
        (4.125, True, 4, 4.125),
        (16.0, False, 16, 16.0),
    ],
)
def test_uniform_takes_highest_fitting_width(avg_bits: float, symmetric: bool, expected: int, eff: float) -> None:
    layers = layers_equal(3, {4: 0.1, 8: 0.01})
    got = allocate_uniform(layers, avg_bits, [4, 8, 16], QuantScheme(128, symmetric))
    assert got.bits == {l.name: expected for l in layers}
    assert got.effective_bits == eff and got.rule == "uniform" and got.budget == avg_bits
    assert got.objective == pytest.approx(3 * {4: 0.1, 8: 0.01, 16: 0.0}[expected], rel=1e-12)


def test_uniform_infeasible_and_profile_input() -> None:
    with pytest.raises(BudgetInfeasible) as info:
        allocate_uniform(profile([0.0, 1.0]), 4.0, [4, 8], QuantScheme(128))
    assert info.value.details["min_avg_bits"] == 4.1875
    got = allocate_uniform(profile([0.0, 1.0]), 5.0, [4, 8], QuantScheme(128))
    assert got.bits == {"model.layers.0": 4, "model.layers.1": 4}
    # errors unknown for the chosen width -> no objective
    assert allocate_uniform([LayerCost("a", 1, 1.0, {})], 5.0, [4], QuantScheme(128)).objective is None


# ------------------------------------------------------------------------------ paper rule


def test_paper_taq_top_quarter_at_8_bits() -> None:
    imp = [0.5, 2.0, -1.0, 3.0, 0.1, 2.0, 0.0, -0.3, 1.0, 0.2]  # 10 layers: ceil(2.5) = 3 at 8
    got = allocate_paper(profile(imp), Method.taq, QuantScheme(128))
    eights = {n for n, b in got.bits.items() if b == 8}
    # 3.0 (layer 3), then the 2.0 tie between layers 1 and 5: both fit
    assert eights == {"model.layers.3", "model.layers.1", "model.layers.5"}
    assert set(got.bits.values()) == {4, 8} and got.rule == "paper" and got.budget is None
    assert got.effective_bits == pytest.approx((3 * 8.1875 + 7 * 4.1875) / 10, abs=1e-12)
    # a tie at the cut goes to the earlier layer
    tie = allocate_paper(profile([1.0, 1.0, 1.0, 1.0]), "taq", QuantScheme(128))
    assert tie.bits == {"model.layers.0": 8, "model.layers.1": 4, "model.layers.2": 4, "model.layers.3": 4}


def test_paper_taq_effective_bits_exact() -> None:
    got = allocate_paper(profile([float(i) for i in range(8)]), "taq", QuantScheme(128))
    assert got.bits["model.layers.7"] == 8 and got.bits["model.layers.6"] == 8
    assert got.effective_bits == 5.1875  # (2·8.1875 + 6·4.1875) / 8


@pytest.mark.parametrize("n_layers, k", [(30, 4), (25, 4), (9, 4), (8, 4), (7, 3), (5, 1)])
def test_paper_taqo_keeps_eight_layers_at_16(n_layers: int, k: int) -> None:
    rng = random.Random(n_layers)
    imp = [rng.random() for _ in range(n_layers)]
    imp[0] = imp[-1] = 100.0  # edges are kept anyway; must not use up the top-k
    got = allocate_paper(profile(imp, method="taqo"), Method.taqo, QuantScheme(128, True))
    names = [f"model.layers.{i}" for i in range(n_layers)]
    rest = names[2:-2]
    top = sorted(rest, key=lambda n: -imp[names.index(n)])[:k]
    expected16 = set(names[:2]) | set(names[-2:]) | set(top)
    assert {n for n, b in got.bits.items() if b == 16} == expected16
    assert {n for n, b in got.bits.items() if b == 4} == set(names) - expected16
    assert got.effective_bits == pytest.approx(
        (16 * len(expected16) + 4.125 * (n_layers - len(expected16))) / n_layers, abs=1e-12
    )


def test_paper_taqo_tiny_model_keeps_everything() -> None:
    got = allocate_paper(profile([0.0] * 4, method="taqo"), "taqo", QuantScheme(128))
    assert set(got.bits.values()) == {16}


def test_paper_with_layer_costs_and_importance_mapping() -> None:
    layers = layers_equal(4, {4: 0.1, 8: 0.01})
    imp = {"model.layers.0": 0.0, "model.layers.1": 0.0, "model.layers.2": 9.0, "model.layers.3": 0.0}
    got = allocate_paper(layers, "taq", QuantScheme(128), importance=imp)
    assert got.bits["model.layers.2"] == 8 and sum(b == 8 for b in got.bits.values()) == 1
    assert got.objective == pytest.approx(3 * 0.1 + 0.01, rel=1e-12)
    with pytest.raises(ValueError, match="needs `importance`"):
        allocate_paper(layers, "taq", QuantScheme(128))
    with pytest.raises(ValueError, match="missing layers"):
        allocate_paper(layers, "taq", QuantScheme(128), importance={"model.layers.0": 1.0})


def test_paper_over_budget_explains_cost() -> None:
    with pytest.raises(BudgetInfeasible) as info:
        allocate_paper(profile([float(i) for i in range(8)]), "taq", QuantScheme(128), avg_bits=5.0)
    assert info.value.details["min_avg_bits"] == 5.1875
    assert "5.1875" in info.value.message and "paper rule" in info.value.message
    ok = allocate_paper(profile([float(i) for i in range(8)]), "taq", QuantScheme(128), avg_bits=5.1875)
    assert ok.budget == 5.1875 and ok.effective_bits == 5.1875


@pytest.mark.parametrize("method", ["uniform", "taq_kl", Method.uniform, "nope"])
def test_paper_rejects_other_methods(method) -> None:
    with pytest.raises(InvalidSpec):
        allocate_paper(profile([0.0, 1.0]), method, QuantScheme(128))


def test_layer_costs_from_profile() -> None:
    costs = layer_costs_from_profile(profile([0.0, 1.0], params=77))
    assert costs == [
        LayerCost("model.layers.0", 77, 1.0, {4: 0.1, 8: 0.01}),
        LayerCost("model.layers.1", 77, 1.0, {4: 0.1, 8: 0.01}),
    ]
