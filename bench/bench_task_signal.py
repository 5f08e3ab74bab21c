"""Is a method's layer ranking about the task or about the model? One run, SmolLM2 (CPU).

    python bench/bench_task_signal.py --json bench/out/task_signal.json

For every method, the service's own pipeline (core.pipeline.run_job, RTN, group 128, widths 4/8)
scores the calibration split of every suite; then, for every pair of suites, Spearman's rank
correlation of the layers' importance between the two profiles. A ranking that is the same
whatever task calibrated it (correlation near 1) describes the model; a task-aware method should
rank layers differently for different tasks. Also printed: each method's pass time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_quality import TASKS, read_rows  # noqa: E402
from core.models import resolve_model  # noqa: E402
from core.packaged_models import SMOLLM2_ID, packaged_models  # noqa: E402
from core.pipeline import JobInputs, run_job  # noqa: E402
from core.spec import JobSpec  # noqa: E402
from core.stats import spearman  # noqa: E402
from core.streaming.checkpoints import MemoryStore  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["taq", "taq_kl", "taq_grad"])
    parser.add_argument("--suites", nargs="+", default=["capitals", "arithmetic", "capitals_mc"])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = resolve_model(SMOLLM2_ID, [], packaged_models())
    importance: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, dict[str, float]] = {}
    for method in args.methods:
        for suite in args.suites:
            rows = read_rows(TASKS / suite / "calibration.jsonl")
            spec = JobSpec(
                model=SMOLLM2_ID,
                method=method,
                calibration_dataset_id="bench",
                bit_budget={"avg_bits": 5.0},
                max_calibration_rows=args.rows,
                max_tokens=128,
                seed=0,
                exports=[],
            )
            t0 = time.perf_counter()
            outputs = run_job(JobInputs(spec=spec, source=source, rows=rows), MemoryStore())
            seconds.setdefault(method, {})[suite] = time.perf_counter() - t0
            importance.setdefault(method, {})[suite] = [l.importance for l in outputs.profile.layers]
            print(f"{method} on {suite}: {seconds[method][suite]:.0f}s", flush=True)
    pairs = []
    for method in args.methods:
        for a, b in itertools.combinations(args.suites, 2):
            rho = spearman(importance[method][a], importance[method][b])
            pairs.append({"method": method, "suites": [a, b], "spearman": rho})
            print(f"{method:9s} {a} ~ {b}: Spearman {rho:+.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"pairs": pairs, "seconds": seconds, "importance": importance}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
