"""The paper's fixed allocation rule (`allocation: "paper"`): taq keeps the top quarter of layers by
importance at 8 bits, taqo (and taqo_gen) eight layers at 16 (the first two, the last two and the top
four of the others, as the paper's code keeps `topk=8` with `keep_first=2, keep_last=2`); everything
else at 4. Pure: scores in, bits out (core/allocation.py holds the costs and the exact budget solver)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from core.allocation import LayerCost, as_layers, display_up, effective_of, exact_budget, objective_of
from core.errors import BudgetInfeasible, InvalidSpec
from core.scheme import QuantScheme
from core.spec import PAPER_METHODS, PAPER_METHODS_TEXT, AllocationRule, Method
from core.types import BitAllocation, Profile

__all__ = ["TAQO_KEPT_LAYERS", "allocate_paper"]

#: layers taqo's paper rule keeps at 16 bits, the first two and the last two among them
TAQO_KEPT_LAYERS = 8


def _ranked(names: Sequence[str], importance: Mapping[str, float]) -> list[str]:
    """Most important first; ties go to the earlier layer."""
    position = {n: i for i, n in enumerate(names)}
    return sorted(names, key=lambda n: (-importance[n], position[n]))


def allocate_paper(
    profile_or_layers: Profile | Sequence[LayerCost],
    method: Method | str,
    scheme: QuantScheme,
    avg_bits: float | None = None,
    *,
    importance: Mapping[str, float] | None = None,
) -> BitAllocation:
    """The paper's fixed rule (bit_choices do not apply).

    taq:  the top ⌈L/4⌉ layers by importance → 8 bits, the rest → 4.
    taqo (and taqo_gen): 8 layers → 16 bits: the first 2 and last 2, plus the top 4 of the others by
          importance (Δ task score); the rest → 4 (a model of at most 8 layers keeps them all).
    Importance comes from the Profile, or from `importance` (name → score) with LayerCosts. Ties
    rank the earlier layer first. With `avg_bits`, a result above it raises `BudgetInfeasible`.
    """
    method_name = method.value if isinstance(method, Method) else str(method)
    if method_name not in [m.value for m in PAPER_METHODS]:
        raise InvalidSpec(f"allocation 'paper' is defined for methods {PAPER_METHODS_TEXT}, not {method_name!r}")
    layers = as_layers(profile_or_layers)
    names = [l.name for l in layers]
    if isinstance(profile_or_layers, Profile):
        scores = {l.name: float(l.importance) for l in profile_or_layers.layers}
    elif importance is None:
        raise ValueError("allocate_paper needs `importance` when given LayerCosts instead of a Profile")
    else:
        missing = [n for n in names if n not in importance]
        if missing:
            raise ValueError(f"importance is missing layers {missing}")
        scores = {n: float(importance[n]) for n in names}
    nan = [n for n in names if math.isnan(scores[n])]
    if nan:
        raise ValueError(f"importance is NaN for layers {nan}")

    count = len(layers)
    if method_name == Method.taq.value:
        top = set(_ranked(names, scores)[: -(-count // 4)])
        bits = {n: 8 if n in top else 4 for n in names}
        rule_text = f"taq: top {len(top)} of {count} layers at 8 bits, the rest at 4"
    else:
        edges = set(names[:2]) | set(names[-2:])
        rest = [n for n in names if n not in edges]
        k = min(len(rest), max(0, TAQO_KEPT_LAYERS - len(edges)))
        keep = edges | set(_ranked(rest, scores)[:k])
        bits = {n: 16 if n in keep else 4 for n in names}
        rule_text = f"taqo: first 2, last 2 and top {k} of {count} layers at 16 bits, the rest at 4"

    achieved = effective_of(layers, bits, scheme)
    if avg_bits is not None and achieved > exact_budget(avg_bits):
        raise BudgetInfeasible(
            f"the paper rule ({rule_text}; {scheme.describe()}) costs "
            f"{display_up(achieved)} effective bits, above the budget avg_bits={avg_bits}; raise "
            "avg_bits or use allocation 'budget'",
            details={"min_avg_bits": float(achieved), "avg_bits": float(avg_bits)},
        )
    return BitAllocation(
        bits=bits,
        effective_bits=float(achieved),
        budget=None if avg_bits is None else float(avg_bits),
        rule=AllocationRule.paper,
        objective=objective_of(layers, bits),
        solver=f"paper-{method_name}",
    )
