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
    table = markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot:
        plot(rows, args.plot, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
