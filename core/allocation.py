"""Bits per layer from scores and a budget: exact budget allocation and the uniform baseline (the
paper's fixed rule is core/allocation_paper.py).

Costs are exact integers: U times the stored bits (`core.scheme.QuantScheme.stored_bits`), in
"bit/U" units, U = `QuantScheme.cost_unit` (the group size g, or the lcm of the group sizes when
widths have their own). A linear [out, in] at b bits stores out·in codes and out·⌈in/g_b⌉ groups of
overhead (a float16 scale, plus an int8 zero point when asymmetric, or an fp16 offset with a float
zero point), so the padded last group of a row is counted; 16 bits costs out·in·16. A unit without
known shapes (profiles from before they were kept) counts its n weights as whole groups,
n·(b·U + overhead·U/g_b). The budget is ⌊avg_bits·U·Σn⌋ units, with `avg_bits` taken as the decimal
the user wrote (4.3 is 43/10, not its binary float), so "meets the budget" involves no rounding at all.

The units are layers, or (per-linear allocation) single linears and groups of linears that
runtimes fuse (`linear_units`, expanded to bits per linear by `expand_units`).
`allocate_budget` (a multiple-choice knapsack) minimises, lexicographically,
  1. Σ s_l·e_l(b_l)   the sensitivity-weighted relative output error (the objective), or, for a
                      method that predicts the task-loss increase of each width itself
                      (`LayerCost.predicted`, e.g. taq_grad), Σ p_l(b_l), that prediction,
  2. Σ n_l·e_l(b_l)   unweighted, size-weighted error: only decides between allocations with
                      exactly equal objective, so that leftover budget still buys precision
                      where sensitivities are 0 (all zero, or for some layers),
  3. total cost       cheaper wins when both errors tie,
  4. exact ties: more bits on later layers (lexicographically highest bits read from the last
                 layer backwards), a consequence of the DP's deterministic candidate order.
It is solved exactly by a dynamic programme over layers that keeps the Pareto frontier of
(cost, (objective, secondary)) states; states over budget are dropped. With equal-size layers (a
transformer) the frontier stays tiny. If it ever grows past `max_states`, the solve restarts on a
grid: each layer's cost above its cheapest choice is rounded UP to `grid_steps` units of the
slack budget, which bounds the frontier by `grid_steps + 1` and still always meets the real budget
(it may leave a little budget unused); `solver` records which ran.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import cast

from core.allocation_dp import Option, TooManyStates, solve
from core.errors import BudgetInfeasible, InvalidSpec
from core.scheme import QuantScheme
from core.spec import ALLOWED_BITS, AllocationRule, AllocationUnit, Method
from core.types import BitAllocation, LinearProfile, Profile

EXACT_SOLVER = "exact-pareto-dp"


@dataclass(frozen=True)
class LayerCost:
    """One allocation unit: `quant_error[b]` is e_l(b) (relative output error at b bits; an absent
    16 means 0) and `sensitivity` (>= 0) weighs it in the objective. `shapes` are its linears'
    [out, in] (empty when unknown: the weights are then counted as whole groups). `predicted`,
    when set, is the method's predicted task-loss increase per width (an absent 16 means 0): the
    objective term is then predicted[b] instead of sensitivity · quant_error[b]."""

    name: str
    params: int
    sensitivity: float
    quant_error: dict[int, float]
    shapes: tuple[tuple[int, int], ...] = ()
    predicted: dict[int, float] | None = None


def _shapes(linears: Iterable[LinearProfile]) -> tuple[tuple[int, int], ...]:
    shapes = tuple(l.shape for l in linears)
    return () if not shapes or any(s is None for s in shapes) else cast(tuple[tuple[int, int], ...], shapes)


def layer_costs_from_profile(profile: Profile) -> list[LayerCost]:
    return [
        LayerCost(
            l.name, l.params, l.sensitivity, dict(l.quant_error), _shapes(l.linears), dict(l.predicted_loss) or None
        )
        for l in profile.layers
    ]


@dataclass(frozen=True)
class LinearUnit:
    """One unit of per-linear allocation: linears a runtime fuses into one matrix (q/k/v,
    gate/up; see `core.modules.fused_linear_groups`) or a single linear, with their joint cost.
    `cost.name` is the first member's name."""

    cost: LayerCost
    linears: tuple[str, ...]


def linear_units(profile: Profile) -> list[LinearUnit]:
    """Per-linear allocation units of a profile. A layer's objective term is s_l·e_l with
    e_l = Σ_j n_j·e_j / n_l; a unit U of its linears gets sensitivity s_l·n_U/n_l and error
    Σ_{j∈U} n_j·e_j / n_U, so giving every unit of a layer one width reproduces the per-layer
    objective exactly, and the per-linear optimum is never worse than the per-layer one."""
    from core.modules import fused_linear_groups

    missing = [l.name for l in profile.layers if not l.linears]
    if missing:
        raise InvalidSpec(
            f"the profile has no per-linear errors for {missing[:3]}"
            f"{' …' if len(missing) > 3 else ''}; it was scored before they were "
            "kept: score again for allocation_unit 'linear'"
        )
    units = []
    for layer in profile.layers:
        by_name = {lin.name: lin for lin in layer.linears}
        for names in fused_linear_groups(list(by_name)):
            members = [by_name[n] for n in names]
            n_unit = sum(m.params for m in members)
            widths = set.intersection(*(set(m.quant_error) for m in members))
            error = {b: sum(m.params * m.quant_error[b] for m in members) / n_unit for b in sorted(widths)}
            predicted = None
            if all(m.predicted_loss for m in members):  # a predicted loss is additive over linears
                shared = set.intersection(*(set(m.predicted_loss) for m in members))
                predicted = {b: sum(m.predicted_loss[b] for m in members) for b in sorted(shared)}
            sensitivity = layer.sensitivity * n_unit / layer.params
            units.append(
                LinearUnit(LayerCost(names[0], n_unit, sensitivity, error, _shapes(members), predicted), tuple(names))
            )
    return units


def expand_units(allocation: BitAllocation, units: Sequence[LinearUnit]) -> BitAllocation:
    """The allocation over units as bits per linear (`unit` "linear")."""
    bits = {name: allocation.bits[u.cost.name] for u in units for name in u.linears}
    return replace(allocation, bits=bits, unit=AllocationUnit.linear)


# ------------------------------------------------------------------------------ shared helpers


def layer_cost(layer: LayerCost, bits: int, scheme: QuantScheme) -> int:
    """U · stored bits of the unit at `bits` on `scheme` (U = `scheme.cost_unit`, the lcm of its group
    sizes), an exact integer (see the module docstring)."""
    unit = scheme.cost_unit
    if layer.shapes:
        return unit * sum(scheme.stored_bits(bits, shape) for shape in layer.shapes)
    if bits >= 16:
        return 16 * unit * layer.params
    return layer.params * (bits * unit + scheme.overhead_bits(bits) * (unit // scheme.group_size_at(bits)))


def budget_units(layers: Sequence[LayerCost], avg_bits: float, scheme: QuantScheme) -> int:
    """The budget in `layer_cost` units: ⌊avg_bits · U · Σn⌋, avg_bits the decimal the user wrote."""
    return math.floor(exact_budget(avg_bits) * scheme.cost_unit * sum(l.params for l in layers))


def check_lowest_fits(
    layers: Sequence[LayerCost], avg_bits: float, choices: Sequence[int], scheme: QuantScheme
) -> tuple[int, int]:
    """(budget, cost of every layer at the lowest choice) in `layer_cost` units; BudgetInfeasible
    (details `min_avg_bits`) when even that exceeds the budget."""
    budget = budget_units(layers, avg_bits, scheme)
    base = sum(layer_cost(l, choices[0], scheme) for l in layers)
    if base > budget:
        min_bits = Fraction(base, scheme.cost_unit * sum(l.params for l in layers))
        raise BudgetInfeasible(
            f"bit budget avg_bits={avg_bits} cannot be met: with bit_choices {list(choices)} "
            f"({scheme.describe()}) the smallest achievable is "
            f"{display_up(min_bits)} effective bits (every layer at {choices[0]} bits); raise avg_bits or "
            "allow fewer bits",
            details={"min_avg_bits": float(min_bits), "avg_bits": float(avg_bits)},
        )
    return budget, base


def exact_budget(avg_bits: float) -> Fraction:
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not math.isfinite(avg_bits):
        raise ValueError(f"avg_bits must be a finite number, got {avg_bits!r}")
    if avg_bits <= 0:
        raise ValueError(f"avg_bits must be positive, got {avg_bits}")
    return Fraction(repr(float(avg_bits)))  # the decimal the user wrote, not its binary value


def check_choices(bit_choices: Sequence[int]) -> list[int]:
    choices = sorted(set(bit_choices))
    if not choices:
        raise ValueError("bit_choices is empty")
    bad = [b for b in choices if b not in ALLOWED_BITS]
    if bad:
        raise ValueError(f"bit_choices {bad} not allowed; choose from {list(ALLOWED_BITS)}")
    return choices


def as_layers(profile_or_layers: Profile | Sequence[LayerCost]) -> list[LayerCost]:
    layers = (
        layer_costs_from_profile(profile_or_layers)
        if isinstance(profile_or_layers, Profile)
        else list(profile_or_layers)
    )
    if not layers:
        raise ValueError("no layers to allocate")
    seen: set[str] = set()
    for layer in layers:
        if layer.name in seen:
            raise ValueError(f"duplicate layer name {layer.name!r}")
        seen.add(layer.name)
        if isinstance(layer.params, bool) or not isinstance(layer.params, int) or layer.params <= 0:
            raise ValueError(f"layer {layer.name!r}: params must be a positive int, got {layer.params!r}")
    return layers


def _error(layer: LayerCost, bits: int) -> float | None:
    e = layer.quant_error.get(bits)
    if e is None:
        return 0.0 if bits >= 16 else None
    return float(e)


def _term(layer: LayerCost, bits: int) -> float | None:
    """The unit's objective term at `bits`: predicted[b], else s·e(b); None when unknown."""
    if layer.predicted is not None:
        p = layer.predicted.get(bits)
        if p is None:
            return 0.0 if bits >= 16 else None
        return float(p)
    e = _error(layer, bits)
    return None if e is None else layer.sensitivity * e


def objective_of(layers: Sequence[LayerCost], bits: Mapping[str, int]) -> float | None:
    """Σ s·e(b) (or Σ predicted(b)) in layer order, or None when a term is unknown."""
    total = 0.0
    for layer in layers:
        term = _term(layer, bits[layer.name])
        if term is None:
            return None
        total += term
    return total


def effective_of(layers: Sequence[LayerCost], bits: Mapping[str, int], scheme: QuantScheme) -> Fraction:
    """Exact stored bits per weight of `bits` over `layers`."""
    cost = sum(layer_cost(l, bits[l.name], scheme) for l in layers)
    return Fraction(cost, scheme.cost_unit * sum(l.params for l in layers))


def priced_allocation(
    layers: Sequence[LayerCost],
    bits: dict[str, int],
    avg_bits: float,
    scheme: QuantScheme,
    rule: AllocationRule | Method,
    solver: str,
) -> BitAllocation:
    """`bits` as a BitAllocation: its exact effective bits and objective over `layers`."""
    return BitAllocation(
        bits=bits,
        effective_bits=float(effective_of(layers, bits, scheme)),
        budget=float(avg_bits),
        rule=rule,
        objective=objective_of(layers, bits),
        solver=solver,
    )


def display_up(x: Fraction | float) -> str:
    """4 decimals rounded up, so the number shown is itself a feasible budget."""
    return f"{math.ceil(Fraction(x) * 10_000) / 10_000:.4f}"


# ------------------------------------------------------------------------------ budget (exact MCKP)


def allocate_budget(
    layers: Profile | Sequence[LayerCost],
    avg_bits: float,
    bit_choices: Sequence[int],
    scheme: QuantScheme,
    *,
    max_states: int = 100_000,
    grid_steps: int = 10_000,
) -> BitAllocation:
    """Exact minimum of Σ s_l·e_l(b_l) s.t. Σ n_l·eff(b_l) ≤ avg_bits·Σ n_l (see module docstring).

    Raises `BudgetInfeasible` (details `min_avg_bits`) when even the lowest choice everywhere
    exceeds the budget, and ValueError for a missing e_l(b) or bad inputs.
    """
    choices = check_choices(bit_choices)
    layers = as_layers(layers)
    exact_budget(avg_bits)  # a bad avg_bits is refused before the per-layer checks
    for layer in layers:
        if not (math.isfinite(layer.sensitivity) and layer.sensitivity >= 0):
            raise ValueError(f"layer {layer.name!r}: sensitivity must be finite and >= 0, got {layer.sensitivity}")
        for b in choices:
            e = _error(layer, b)
            if e is None:
                raise ValueError(f"layer {layer.name!r}: quant_error has no entry for {b} bits")
            if not (math.isfinite(e) and e >= 0):
                raise ValueError(f"layer {layer.name!r}: quant_error[{b}] must be finite and >= 0, got {e}")
            term = _term(layer, b)
            if term is None:
                raise ValueError(f"layer {layer.name!r}: predicted has no entry for {b} bits")
            if not (math.isfinite(term) and term >= 0):
                raise ValueError(f"layer {layer.name!r}: predicted[{b}] must be finite and >= 0, got {term}")

    costs = [{b: layer_cost(l, b, scheme) for b in choices} for l in layers]
    budget, base = check_lowest_fits(layers, avg_bits, choices, scheme)
    slack = budget - base

    def build(scale: int | None) -> list[list[Option]]:
        out = []
        for layer, cost in zip(layers, costs):
            opts = []
            for b in choices:
                true_extra = cost[b] - cost[choices[0]]
                # grid: round UP so a grid-feasible allocation is always truly feasible
                extra = true_extra if scale is None else -(-true_extra * scale // slack)
                e, term = _error(layer, b), _term(layer, b)
                assert e is not None and term is not None  # every width was checked above
                opts.append(Option(b, extra, true_extra, term, layer.params * e))
            out.append(opts)
        return out

    options = build(None)
    solver = EXACT_SOLVER
    try:
        chosen = solve(options, slack, max_states)
    except TooManyStates:
        options = build(grid_steps)
        solver = f"grid-dp(steps={grid_steps}, costs rounded up)"
        chosen = solve(options, grid_steps, None)

    bits = {l.name: options[i][chosen[i]].bits for i, l in enumerate(layers)}
    spent = base + sum(options[i][chosen[i]].true_extra for i in range(len(layers)))
    assert spent <= budget  # guaranteed by construction; a failure is a bug, not a user error
    return priced_allocation(layers, bits, avg_bits, scheme, AllocationRule.budget, solver)


# ------------------------------------------------------------------------------ uniform


def allocate_uniform(
    profile_or_layers: Profile | Sequence[LayerCost],
    avg_bits: float,
    bit_choices: Sequence[int],
    scheme: QuantScheme,
) -> BitAllocation:
    """Every layer (or linear) at the highest choice whose effective bits fit `avg_bits` (baseline)."""
    choices = check_choices(bit_choices)
    layers = as_layers(profile_or_layers)
    budget = exact_budget(avg_bits)
    every = {b: effective_of(layers, {l.name: b for l in layers}, scheme) for b in choices}
    fitting = [b for b in choices if every[b] <= budget]
    if not fitting:
        min_bits = every[choices[0]]
        raise BudgetInfeasible(
            f"bit budget avg_bits={avg_bits} cannot be met by a uniform allocation: the lowest of "
            f"bit_choices {choices} ({scheme.describe()}) costs {display_up(min_bits)} "
            "effective bits",
            details={"min_avg_bits": float(min_bits), "avg_bits": float(avg_bits)},
        )
    bits = {l.name: fitting[-1] for l in layers}
    return priced_allocation(layers, bits, avg_bits, scheme, Method.uniform, "uniform")
