"""Task score retained by each method at equal bit budgets, on SmolLM2-135M-Instruct (CPU).

    python bench/bench_quality.py --suite capitals --avg-bits 4.5 --group-size 128 \
        --methods uniform taq taq_kl taqo --calibration-rows 32 --eval-limit 150

For every method and budget: score (on the suite's calibration split) → allocate → quantize with
core.pipeline, put the dequantized weights into a copy of the model, then greedy-evaluate the
suite's eval split (contains / F1 with 95 % bootstrap CIs) and measure next-token fidelity to the
full-precision model (mean KL, top-1 agreement). All rows come from one run on the same data.
Prints a markdown table for BENCHMARKS.md.

Caveat: the packaged SmolLM2 weights are Q4_1 (asymmetric blocks of 32), so 4-bit asymmetric
groups of 32 reproduce them almost exactly; use group sizes 64 and 128.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.data import render_prompt, tokenize_rows  # noqa: E402
from core.evaluation import evaluate_generation, fidelity  # noqa: E402
from core.models import load_model, resolve_model  # noqa: E402
from core.packaged_models import SMOLLM2_ID, packaged_models  # noqa: E402
from core.pipeline import apply_quantized, run_pipeline  # noqa: E402
from core.spec import CalibrationRow, JobSpec  # noqa: E402

TASKS = ROOT / "bench" / "tasks"


def read_rows(path: Path) -> list[CalibrationRow]:
    return [CalibrationRow.model_validate_json(line)
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="capitals")
    parser.add_argument("--avg-bits", type=float, nargs="+", default=[4.5])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--bit-choices", type=int, nargs="+", default=[3, 4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=["uniform", "taq", "taq_kl", "taqo"])
    parser.add_argument("--calibration-rows", type=int, default=32)
    parser.add_argument("--eval-limit", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    source = resolve_model(SMOLLM2_ID, [], packaged_models())
    loaded = load_model(source, device="cpu", dtype=torch.float32)
    tokenizer = loaded.tokenizer
    calibration = read_rows(TASKS / args.suite / "calibration.jsonl")
    evaluation = read_rows(TASKS / args.suite / "eval.jsonl")[: args.eval_limit]
    prompts = [render_prompt(r, tokenizer) for r in evaluation]
    golds = [r.answers or [] for r in evaluation]
    fid_ids = tokenize_rows(evaluation[:64], tokenizer, 128)

    t0 = time.perf_counter()
    fp = evaluate_generation(loaded.model, tokenizer, prompts, golds)
    rows = [{"method": "full precision", "avg_bits": None, "effective_bits": 16.0,
             "contains": fp.contains_match.to_dict(), "f1": fp.f1_score.to_dict(),
             "mean_kl": 0.0, "top1": 1.0, "wall_s": time.perf_counter() - t0}]
    print(f"full precision: contains {fp.contains_match.mean:.3f}", flush=True)

    for budget in args.avg_bits:
        for method in args.methods:
            spec = JobSpec(model=SMOLLM2_ID, method=method, calibration=None,
                           calibration_dataset_id="bench", bit_budget={"avg_bits": budget},
                           bit_choices=args.bit_choices, group_size=args.group_size,
                           max_calibration_rows=args.calibration_rows, max_tokens=128, seed=0)
            t1 = time.perf_counter()
            result = run_pipeline(spec, loaded, calibration)
            output = result.outputs[0]
            model = copy.deepcopy(loaded.model)
            apply_quantized(model, output.weights)
            ev = evaluate_generation(model, tokenizer, prompts, golds)
            fid = fidelity(loaded.model, model, fid_ids)
            wall = time.perf_counter() - t1
            rows.append({"method": method, "avg_bits": budget,
                         "effective_bits": output.allocation.effective_bits,
                         "bits": output.allocation.bits,
                         "contains": ev.contains_match.to_dict(), "f1": ev.f1_score.to_dict(),
                         "mean_kl": fid.mean_kl, "top1": fid.top1_agreement, "wall_s": wall})
            print(f"{method} @ {budget}: contains {ev.contains_match.mean:.3f} "
                  f"eff {output.allocation.effective_bits:.3f} kl {fid.mean_kl:.3f} ({wall:.0f}s)",
                  flush=True)
            del model

    fp_score = fp.contains_match.mean
    print(f"\nsuite `{args.suite}`, eval n={len(evaluation)}, group {args.group_size}, "
          f"bit choices {args.bit_choices}, calibration rows {args.calibration_rows}\n")
    print("| method | budget | effective bits | contains [95% CI] | retained vs FP | F1 | KL to FP | top-1 agree | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["contains"]
        retained = c["mean"] / fp_score if fp_score else float("nan")
        print(f"| {r['method']} | {r['avg_bits'] or '—'} | {r['effective_bits']:.3f} | "
              f"{c['mean']:.3f} [{c['low']:.3f}, {c['high']:.3f}] | {retained:.2f} | "
              f"{r['f1']['mean']:.3f} | {r['mean_kl']:.3f} | {r['top1']:.3f} | {r['wall_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
