"""Tables and plot of bench_quality.py: per suite, every variant's scores with intervals, and every
method against every control at the same budget as paired differences with a verdict.

A row (one weight variant on one suite) is a dict: suite, label, kind ("full precision", "method",
"control", "cross-task", "peer"), method, budget, effective_bits, source (what full precision is),
gold_nll / contains / exact_match / retained (interval dicts), mean_kl, top1, and the per-item
lists `items.gold_nll`, `items.contains`, `items.exact_match` the comparisons are computed from.
"""

from __future__ import annotations

from pathlib import Path

from core.stats import compare

METRICS = ("gold_nll", "contains")


def _ci(value: dict | None, digits: int = 3) -> str:
    if not value:
        return "—"
    return f"{value['mean']:.{digits}f} [{value['low']:.{digits}f}, {value['high']:.{digits}f}]"


def variant_table(rows: list[dict]) -> str:
    lines = [
        "| suite | variant | kind | budget | effective bits | gold NLL ↓ [95% CI] | Δ NLL vs FP | "
        "contains ↑ [95% CI] | retained vs FP | EM | KL vs FP (answer positions) | top-1 vs FP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bits = (
            f"{r['effective_bits']:.3f}"
            if r["kind"] != "full precision"
            else f"{r['effective_bits']:.3f} ({r['source']})"
        )
        lines.append(
            f"| {r['suite']} | {r['label']} | {r['kind']} | {r['budget'] if r['budget'] is not None else '—'} | "
            f"{bits} | {_ci(r['gold_nll'])} | {_ci(r.get('delta_nll'))} | {_ci(r['contains'])} | "
            f"{_ci(r.get('retained'), 2)} | {r['exact_match']['mean']:.3f} | {r['mean_kl']:.4f} | {r['top1']:.3f} |"
        )
    return "\n".join(lines)


#: label marks of a grid other than the run's base one; a control allocated on such a grid is
#: compared only with the methods on the same grid
GRID_MARKS = ("+fz", "+g8w128", "+kq")


def _grid(label: str) -> tuple[str, ...]:
    return tuple(m for m in GRID_MARKS if m in label)


def comparisons(rows: list[dict], seed: int = 0) -> list[dict]:
    """Every method (and cross-task) row against every control row of the same suite and budget
    (a control on a `+fz` / `+g8w128` grid only against the methods on that grid),
    and every method row against the cross-task and peer rows too (another task's profile is a control
    for the task signal), a `+seq` (`+fz`, `+g8w128`) method row also against its twin on fp inputs
    (integer zero points, one group size); on gold NLL
    and contains: the paired difference method − control with its interval."""
    out = []
    for r in rows:
        if r["kind"] not in ("method", "cross-task"):
            continue
        partners = ("control", "cross-task", "peer") if r["kind"] == "method" else ("control",)
        # a +seq row (sequential calibration) is also compared with the same method on fp inputs,
        # a +fz row (float zero points) with the same method on integer zero points, a +g8w128 row
        # (8 bits in groups of 128) with the same method at one group size
        fp_twin = None
        for twin_mark in ("+seq", "+fz", "+g8w128", "+kq"):  # the last mark present names the twin
            if r["kind"] == "method" and twin_mark in r["label"]:
                fp_twin = r["label"].replace(twin_mark, "")
        for c in rows:
            if c["suite"] != r["suite"] or c["budget"] != r["budget"]:
                continue
            if c["kind"] not in partners and not (c["kind"] == "method" and c["label"] == fp_twin):
                continue
            if c["kind"] == "control" and _grid(c["label"]) and _grid(c["label"]) != _grid(r["label"]):
                continue  # a control on another grid than this row's
            for metric in METRICS:
                cmp = compare(
                    r["label"],
                    c["label"],
                    metric,
                    r["items"][metric],
                    c["items"][metric],
                    variant_bits=r["effective_bits"],
                    baseline_bits=c["effective_bits"],
                    seed=seed,
                )
                out.append({"suite": r["suite"], "budget": r["budget"], **cmp.to_dict()})
    return out


def comparison_table(compared: list[dict]) -> str:
    lines = [
        "| suite | budget | method (bits) | control (bits) | metric | method − control [95% CI] | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in compared:
        better = "lower" if c["lower_is_better"] else "higher"
        lines.append(
            f"| {c['suite']} | {c['budget']} | {c['variant']} ({c['variant_effective_bits']:.3f}) | "
            f"{c['baseline']} ({c['baseline_effective_bits']:.3f}) | {c['metric']} ({better} is better) | "
            f"{_ci(c['difference'], 4)} | {c['verdict']} |"
        )
    return "\n".join(lines)


def verdict_summary(compared: list[dict]) -> str:
    """One line per metric: how many method-vs-control comparisons each verdict got."""
    lines = []
    for metric in METRICS:
        mine = [c for c in compared if c["metric"] == metric]
        counts = {
            v: sum(c["verdict"] == v for c in mine) for v in ("beats", "beats_with_more_bits", "no_difference", "loses")
        }
        lines.append(f"- {metric}: {len(mine)} comparisons — " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Per suite: gold-answer NLL (mean and 95 % interval) against effective bits, one marker per kind."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    suites = list(dict.fromkeys(r["suite"] for r in rows))
    fig = Figure(figsize=(5.5 * len(suites), 5.5), dpi=100)
    FigureCanvasAgg(fig)
    markers = {"method": "o", "control": "s", "cross-task": "^", "peer": "D"}
    for i, suite in enumerate(suites):
        ax = fig.add_subplot(1, len(suites), i + 1)
        for r in (r for r in rows if r["suite"] == suite):
            nll = r["gold_nll"]
            if r["kind"] == "full precision":
                ax.axhline(nll["mean"], color="black", lw=0.8, ls=":", label=f"full precision ({r['source']})")
                continue
            ax.errorbar(
                [r["effective_bits"]],
                [nll["mean"]],
                yerr=[[nll["mean"] - nll["low"]], [nll["high"] - nll["mean"]]],
                marker=markers.get(r["kind"], "x"),
                ls="none",
                capsize=3,
                label=r["label"],
            )
        ax.set_title(suite)
        ax.set_xlabel("effective bits (codes + scale/zero per group, padded groups counted)")
        ax.set_ylabel("gold-answer NLL, nats per token (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
