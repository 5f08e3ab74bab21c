"""Terminal tables the client commands print: a job's evaluation (per budget: each variant's task
scores with their 95 % intervals, fidelity to full precision, effective bits) and a profile with
the bits chosen at every budget of a sweep. Pure formatting of the API's JSON."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table

VARIANT_ORDER = ("full_precision", "quantized", "uniform", "error_only", "random")


def format_interval(value: Any, digits: int = 3) -> str:
    """`mean [low, high]` of a ConfidenceInterval dict, `-` when absent."""
    if not isinstance(value, dict) or value.get("mean") is None:
        return "-"
    low, high = value.get("low"), value.get("high")
    bounds = f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None and high is not None else ""
    return f"{value['mean']:.{digits}f}{bounds}"


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def eval_tables(report: dict[str, Any], result: dict[str, Any] | None) -> list[Table]:
    """One table per budget of eval.json: rows full precision / quantized / uniform (and any other
    variant the report holds), columns gold-answer NLL and `contains` with intervals, KL and top-1
    agreement against full precision, effective bits (from the job result)."""
    reports = report.get("budgets", [report])
    budgets = (result or {}).get("budgets") or []
    tables = []
    for i, budget_report in enumerate(reports):
        meta = budget_report.get("meta") or {}
        budget = budgets[i] if i < len(budgets) else {}
        effective = budget.get("effective_bits")
        title = (
            f"evaluation · budget {meta.get('avg_bits', budget.get('avg_bits', '-'))} bits"
            f" · {budget_report.get('n_items', '?')} items · 95 % bootstrap intervals"
        )
        table = Table(
            "variant",
            "gold NLL ↓",
            "contains ↑",
            "exact match",
            "KL vs fp ↓",
            "top-1 vs fp",
            "bits",
            title=title,
            box=box.SIMPLE_HEAD,
        )
        teacher = budget_report.get("teacher_forced") or {}
        generation = budget_report.get("metrics") or {}
        fidelity = budget_report.get("fidelity") or {}
        names = [n for n in VARIANT_ORDER if n in teacher or n in generation]
        names += sorted((set(teacher) | set(generation)) - set(names))
        for name in names:
            scores = generation.get(name) or {}
            close = fidelity.get(name) or {}
            bits = (
                "source"
                if name == "full_precision"
                else _number(
                    meta.get("effective_bits", effective) if name == "quantized" else meta.get(f"{name}_effective_bits")
                )
            )
            table.add_row(
                name.replace("_", " "),
                format_interval((teacher.get(name) or {}).get("gold_nll")),
                format_interval(scores.get("contains")),
                format_interval(scores.get("exact_match")),
                _number(close.get("mean_kl")),
                _number(close.get("top1_agreement")),
                bits,
            )
        if not (budget_report.get("generation") or {}).get("ran", True):
            table.caption = f"greedy generation skipped: {budget_report['generation'].get('skipped_reason')}"
        tables.append(table)
        if budget_report.get("comparisons"):
            tables.append(comparison_table(budget_report["comparisons"], meta.get("avg_bits")))
    return tables


def comparison_table(comparisons: list[dict[str, Any]], avg_bits: Any) -> Table:
    """The quantized model against each task-agnostic control at the same budget: the paired
    difference quantized − control with its interval, and the verdict."""
    table = Table(
        "against",
        "metric",
        "quantized − control",
        "bits (quantized / control)",
        "verdict",
        title=f"quantized vs task-agnostic controls · budget {avg_bits} bits · paired bootstrap",
        box=box.SIMPLE_HEAD,
    )
    for c in comparisons:
        arrow = "↓" if c.get("lower_is_better") else "↑"
        table.add_row(
            str(c.get("baseline", "-")).replace("_", " "),
            f"{c.get('metric')} {arrow}",
            format_interval(c.get("difference"), 4),
            f"{_number(c.get('variant_effective_bits'))} / {_number(c.get('baseline_effective_bits'))}",
            str(c.get("verdict", "-")).replace("_", " "),
        )
    return table


def profile_table(profile: dict[str, Any], result: dict[str, Any] | None) -> Table:
    """The per-layer profile; for a budget sweep one bits column per budget (from the job result),
    since the profile itself holds no single choice."""
    budgets = [b for b in ((result or {}).get("budgets") or []) if isinstance(b.get("bits"), dict)]
    sweep = len(budgets) > 1 or (budgets and all(layer.get("bits") is None for layer in profile["layers"]))
    columns = ["#", "layer", "params", "importance", "sensitivity"]
    columns += (
        [f"bits @{b.get('avg_bits') if b.get('avg_bits') is not None else 'paper'}" for b in budgets]
        if sweep
        else ["bits"]
    )
    table = Table(*columns, title=f"{profile['job_id']} · {profile['model']} · {profile['method']}")
    for layer in profile["layers"]:
        row = [
            str(layer["index"]),
            layer["name"],
            f"{layer['params']:,}",
            f"{layer['importance']:.4g}",
            f"{layer['sensitivity']:.4g}",
        ]
        if sweep:
            row += [_layer_bits(b["bits"], layer) for b in budgets]
        else:
            row.append(str(layer.get("bits") or "-"))
        table.add_row(*row)
    return table


def _layer_bits(bits: dict[str, int], layer: dict[str, Any]) -> str:
    """A layer's bits in a bit map keyed by layer name, or (per-linear allocation) the set of its
    linears' bits."""
    if layer["name"] in bits:
        return str(bits[layer["name"]])
    prefix = layer["name"] + "."
    widths = sorted({b for name, b in bits.items() if name.startswith(prefix)})
    return "/".join(str(b) for b in widths) if widths else "-"
