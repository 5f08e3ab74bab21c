"""Task-agnostic allocations at the same budget: the controls a task-aware allocation must beat.

* `allocate_error_only`: the same exact knapsack (`core.allocation.allocate_budget`) with every
  sensitivity 1 (and a method's predicted loss dropped), so only the measured quantization error
  decides. A method that beats it owes the win to its task signal, not to the solver or the error
  measurements.
* `allocate_random`: layers raised in a seeded random order, each to the widest choice the
  remaining budget pays for. It spends the budget like the method does, on layers chosen blind.
* `allocate_uniform_mix`: the nearest thing to "uniform" at equal effective bits: every layer at
  the widest single choice that fits, then as many layers as the budget pays for one choice
  higher, spread evenly over the depth (first and last included when they fit).

All return a `BitAllocation` that meets the budget exactly as `allocate_budget` does (costs from
`core.allocation.layer_cost`, padded groups counted).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from core.allocation import (
    LayerCost,
    allocate_budget,
    allocate_uniform,
    as_layers,
    budget_units,
    check_choices,
    check_lowest_fits,
    layer_cost,
    priced_allocation,
)
from core.scheme import QuantScheme
from core.spec import AllocationRule, Method
from core.types import BitAllocation, Profile

__all__ = ["allocate_error_only", "allocate_random", "allocate_uniform_mix", "spread"]


def allocate_error_only(
    layers: Profile | Sequence[LayerCost],
    avg_bits: float,
    bit_choices: Sequence[int],
    scheme: QuantScheme,
) -> BitAllocation:
    """`allocate_budget` with every sensitivity set to 1 and no predicted loss (rule "error_only")."""
    flat = [replace(l, sensitivity=1.0, predicted=None) for l in as_layers(layers)]
    allocation = allocate_budget(flat, avg_bits, bit_choices, scheme)
    return replace(allocation, rule=AllocationRule.error_only, solver=f"{allocation.solver}, sensitivities 1")


def allocate_random(
    layers: Profile | Sequence[LayerCost],
    avg_bits: float,
    bit_choices: Sequence[int],
    scheme: QuantScheme,
    *,
    seed: int = 0,
) -> BitAllocation:
    """Every layer at the lowest choice; then, in the order of a `random.Random(seed)` shuffle,
    each layer raised to the widest choice the remaining budget pays for (rule "random")."""
    choices = check_choices(bit_choices)
    layers = as_layers(layers)
    budget, spent = check_lowest_fits(layers, avg_bits, choices, scheme)
    bits = {l.name: choices[0] for l in layers}
    order = list(range(len(layers)))
    random.Random(seed).shuffle(order)
    for i in order:
        layer = layers[i]
        base = layer_cost(layer, choices[0], scheme)
        for b in reversed(choices[1:]):
            extra = layer_cost(layer, b, scheme) - base
            if spent + extra <= budget:
                bits[layer.name] = b
                spent += extra
                break
    return priced_allocation(layers, bits, avg_bits, scheme, AllocationRule.random, f"random(seed={seed})")


def spread(count: int, total: int) -> list[int]:
    """`count` indices out of range(total), evenly spaced, first and last included when count >= 2."""
    if count <= 0:
        return []
    if count >= total:
        return list(range(total))
    if count == 1:
        return [total // 2]
    return sorted({round(k * (total - 1) / (count - 1)) for k in range(count)})


def allocate_uniform_mix(
    layers: Profile | Sequence[LayerCost],
    avg_bits: float,
    bit_choices: Sequence[int],
    scheme: QuantScheme,
) -> BitAllocation:
    """The widest single choice that fits everywhere, plus the most layers one choice higher that
    the budget pays for, evenly spaced over the depth (rule "uniform")."""
    choices = check_choices(bit_choices)
    layers = as_layers(layers)
    # raises when nothing fits
    base_alloc = allocate_uniform(layers, avg_bits, choices, scheme)
    low = next(iter(base_alloc.bits.values()))
    higher = [b for b in choices if b > low]
    if not higher:
        return base_alloc
    high = higher[0]
    budget = budget_units(layers, avg_bits, scheme)
    count = len(layers)
    while count > 0:
        raised = {layers[i].name for i in spread(count, len(layers))}
        bits = {l.name: high if l.name in raised else low for l in layers}
        if sum(layer_cost(l, bits[l.name], scheme) for l in layers) <= budget:
            break
        count -= 1
    if count == 0:
        return base_alloc
    solver = f"uniform-mix({low}/{high} bits, {count} of {len(layers)} layers at {high})"
    return priced_allocation(layers, bits, avg_bits, scheme, Method.uniform, solver)
