"""Merge the JSON of several bench_quality.py runs into one table and one plot.

    python bench/report_quality.py bench/results/g128_rtn.json bench/results/g128_gptq.json \
        --markdown bench/results/g128.md --plot bench/results/g128.png --title "SmolLM2 · group 128"

Runs of the same model and suite share the full-precision row (deterministic greedy evaluation
of the same model gives the same score), so only the first one is kept. Nothing is recomputed:
the rows are those the runs measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_quality import markdown, plot  # noqa: E402


def merge(paths: list[Path]) -> list[dict]:
    rows: list[dict] = []
    seen_fp: set[str] = set()
    for path in paths:
        for row in json.loads(path.read_text()):
            if row["method"] == "full precision":
                if row["suite"] in seen_fp:
                    continue
                seen_fp.add(row["suite"])
            rows.append(row)
    order = list(dict.fromkeys(r["suite"] for r in rows))
    return sorted(rows, key=lambda r: order.index(r["suite"]))


def unique(rows: list[dict]) -> list[dict]:
    seen: set[tuple] = set()
    out = []
    for row in rows:
        key = (row["suite"], row["method"], round(row["effective_bits"], 6))
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


TASK_AWARE = ("taq", "taq_kl", "taqo")
AGNOSTIC = ("uniform", "rtn_matched", "gptq_matched", "hqq")


def _base(method: str) -> str:
    return method.split("+")[0].split(" ")[0]


def summary(rows: list[dict], target: float = 0.9) -> str:
    """Per suite and budget: the best task-aware row (same-task profile) against every
    task-agnostic row (uniform allocation, matched-group peers) whose effective bits are not
    above it — the issue's "beats uniform at equal effective bits" — and the retained target."""
    lines = ["| suite | budget | best task-aware (eff. bits) | retained | best task-agnostic at ≤ those bits "
             "(eff. bits) | retained | ≥ 90 % | beats task-agnostic |", "|---|---|---|---|---|---|---|---|"]
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    for suite in suites:
        mine = [r for r in rows if r["suite"] == suite and r["retained"] is not None]
        budgets = sorted({r["avg_bits"] for r in mine if r["avg_bits"] is not None})
        for budget in budgets:
            aware = [r for r in mine if r["avg_bits"] == budget and _base(r["method"]) in TASK_AWARE
                     and "profile from" not in r["method"]]
            if not aware:
                continue
            best = max(aware, key=lambda r: (r["retained"], -r["effective_bits"]))
            rivals = [r for r in mine if _base(r["method"]) in AGNOSTIC
                      and r["effective_bits"] <= best["effective_bits"] + 1e-9]
            rival = max(rivals, key=lambda r: (r["retained"], -r["effective_bits"])) if rivals else None
            lines.append(
                f"| {suite} | {budget} | {best['method']} ({best['effective_bits']:.3f}) | {best['retained']:.2f} | "
                + (f"{rival['method']} ({rival['effective_bits']:.3f}) | {rival['retained']:.2f} | "
                   if rival else "— | — | ")
                + f"{'yes' if best['retained'] >= target else 'no'} | "
                + f"{'—' if rival is None else 'yes' if best['retained'] > rival['retained'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--title", default="")
    parser.add_argument("--unique", action="store_true",
                        help="keep one row per (suite, method, effective bits): a budget whose "
                             "allocation equals a smaller budget's adds no point")
    args = parser.parse_args(argv)
    rows = merge(args.runs)
    if args.unique:
        rows = unique(rows)
    table = summary(rows) + "\n\n" + markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot:
        plot(rows, args.plot, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
