"""The memory preflight against measured peaks (core.memory vs real jobs).

Each case runs bench/bench_memory.py in a fresh process: one job through core's pipeline with the
worker's imports, a file-backed store and the worker's per-stage peak-RSS tracking (the kernel's
high-water mark, reset at each stage). The estimate the API would compute for the same job must
bound the measured peak, and not by much: 1 ≤ estimate / measured ≤ 1.5. Prompts are truncated to
`max_tokens` = 32 (the capitals prompts are longer), so `rows × max_tokens`, the estimate's token
count, is the real one: the test checks the memory model, not the token bound, which errs high
on purpose for shorter prompts. The 1B/8B-shaped checkpoints are measured by bench/bench_scale.py
(BENCHMARKS.md, "Scale").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    "tiny taq rtn": ["--model", "tiny-llama", "--method", "taq", "--quantizer", "rtn", "--rows", "8"],
    "tiny taq_kl gptq + eval": [
        "--model",
        "tiny-llama",
        "--method",
        "taq_kl",
        "--quantizer",
        "gptq",
        "--rows",
        "8",
        "--eval",
    ],
    "smollm2 taq gptq + eval": ["--method", "taq", "--quantizer", "gptq", "--rows", "88", "--eval"],
    "smollm2 taq_kl rtn": ["--method", "taq_kl", "--quantizer", "rtn", "--rows", "64"],
}


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case", list(CASES))
def test_estimate_bounds_the_measured_peak(case: str, tiny_model_root: Path, tmp_path: Path, record_property) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bench_memory.py"),
        *CASES[case],
        "--max-tokens",
        "32",
        "--model-root",
        str(tiny_model_root),
        "--work",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    record_property("memory", json.dumps(result))  # in --junitxml reports (BENCHMARKS.md figures)
    assert result["per_stage_reset"], "the kernel's high-water mark could not be reset per stage"
    assert 1.0 <= result["ratio"] <= 1.5, result
