"""taqo_gen against taqo on a real model: what the paper's generation-based oracle costs, and
whether it ranks layers as the teacher-forced variant does.

    python bench/bench_taqo_gen.py --suite capitals --json bench/out/taqo_gen.json

One run, SmolLM2-135M (CPU), the suite's calibration split: the service's own job (`run_job`, no
exports, no evaluation) once with `method: taqo` and once with `method: taqo_gen`, the same spec
otherwise. Prints each job's wall time and the ratio, how many layers have a positive Δ, and
Spearman's rank correlation between the two importances (taqo: Δ gold-answer NLL; taqo_gen: Δ of
0.5·(EM + F1) of the greedy answers).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="capitals")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--bit-choices", type=int, nargs="+", default=[3, 4, 5, 6, 8, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = resolve_model(SMOLLM2_ID, [], packaged_models())
    rows = read_rows(TASKS / args.suite / "calibration.jsonl")
    runs = {}
    for method in ("taqo", "taqo_gen"):
        spec = JobSpec(
            model=SMOLLM2_ID,
            method=method,
            calibration_dataset_id="bench",
            bit_budget={"avg_bits": 5.0},
            bit_choices=args.bit_choices,
            max_calibration_rows=args.rows,
            max_tokens=128,
            exports=[],
        )
        t0 = time.perf_counter()
        outputs = run_job(JobInputs(spec=spec, source=source, rows=rows), MemoryStore())
        seconds = time.perf_counter() - t0
        importance = [layer.importance for layer in outputs.profile.layers]
        positive = sum(1 for x in importance if x > 0)
        runs[method] = {"seconds": seconds, "importance": importance, "positive": positive}
        print(f"{method}: {seconds:.0f} s, {positive} of {len(importance)} layers with Δ > 0", flush=True)
    rho = spearman(runs["taqo"]["importance"], runs["taqo_gen"]["importance"])
    ratio = runs["taqo_gen"]["seconds"] / runs["taqo"]["seconds"]
    print(f"taqo_gen / taqo wall time: {ratio:.2f}x; Spearman(importance) = {rho:.3f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"suite": args.suite, "ratio": ratio, "spearman": rho, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
