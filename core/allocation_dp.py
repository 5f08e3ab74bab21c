"""The exact multiple-choice knapsack behind `core.allocation.allocate_budget`: a Pareto dynamic
programme over the layers, one option (a width and its cost and objective) per layer chosen."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

__all__ = ["Option", "TooManyStates", "solve"]


@dataclass(frozen=True)
class Option:
    bits: int
    extra: int  # cost above the layer's cheapest choice, in solver units
    true_extra: int  # the same in exact units (differs from `extra` on the grid)
    primary: float
    secondary: float


class TooManyStates(Exception):
    """The frontier outgrew `max_states` (the caller falls back to a coarser grid)."""


def solve(options: list[list[Option]], slack: int, max_states: int | None) -> list[int]:
    """Pareto DP; returns the chosen option index per layer.

    A frontier is sorted by cost with strictly decreasing (primary, secondary). Candidates are
    taken in (cost, primary, secondary, parent index) order and kept only when they strictly
    improve (primary, secondary): that prunes dominated states and, on an exact tie, keeps the
    cheaper prefix (lower parent index), i.e. the more expensive choice for the current layer.
    """
    costs, prims, secs = [0], [0.0], [0.0]
    back: list[list[tuple[int, int]]] = []
    for layer_opts in options:
        streams = []
        for oi, opt in enumerate(layer_opts):
            streams.append(
                [
                    (costs[p] + opt.extra, prims[p] + opt.primary, secs[p] + opt.secondary, p, oi)
                    for p in range(len(costs))
                    if costs[p] + opt.extra <= slack
                ]
            )
        new_costs: list[int] = []
        new_prims: list[float] = []
        new_secs: list[float] = []
        new_back: list[tuple[int, int]] = []
        best: tuple[float, float] | None = None
        # each stream is strictly increasing in cost, so merging them sorts all candidates
        for cost, prim, sec, parent, oi in heapq.merge(*streams):
            if best is not None and (prim, sec) >= best:
                continue  # dominated: no better at no lower cost
            if new_costs and new_costs[-1] == cost:
                continue  # same cost, an earlier candidate already won the tie
            best = (prim, sec)
            new_costs.append(cost)
            new_prims.append(prim)
            new_secs.append(sec)
            new_back.append((parent, oi))
        if max_states is not None and len(new_costs) > max_states:
            raise TooManyStates
        costs, prims, secs = new_costs, new_prims, new_secs
        back.append(new_back)
    # the last frontier state has the best (primary, secondary); equal ones at higher cost were pruned
    state = len(costs) - 1
    chosen = [0] * len(options)
    for layer_index in range(len(options) - 1, -1, -1):
        parent, oi = back[layer_index][state]
        chosen[layer_index] = oi
        state = parent
    return chosen
