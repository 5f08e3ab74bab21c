"""The streaming pipeline on a CUDA device: the same code path as on the CPU, with layers onloaded
in bf16, float32 linear-input records and GPTQ factorisations on the GPU. Run where a GPU is
present (`pytest -m gpu`); `make test` deselects these."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.models import resolve_model
from core.pipeline import JobInputs, run_job
from core.spec import CalibrationRow, JobSpec
from core.streaming.checkpoints import MemoryStore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROWS = [CalibrationRow(prompt=f"What is {i} plus {i + 3}?", answers=[str(2 * i + 3)]) for i in range(12)]


def spec(**overrides) -> JobSpec:
    fields = dict(
        model="tiny-llama",
        method="taq",
        calibration=ROWS,
        bit_budget={"avg_bits": 6.0},
        bit_choices=[4, 8, 16],
        group_size=32,
        max_tokens=48,
        seed=0,
        exports=["hf", "gguf"],
        eval_fraction=0.25,
    )
    fields.update(overrides)
    return JobSpec(**fields)


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_job_runs_on_cuda_in_bf16(tiny_model_root: Path, quantizer: str) -> None:
    source = resolve_model("tiny-llama", [tiny_model_root], {})
    torch.cuda.reset_peak_memory_stats()
    store = MemoryStore()
    out = run_job(
        JobInputs(spec=spec(quantizer=quantizer), source=source, rows=ROWS[:9], eval_rows=ROWS[9:], device="cuda"),
        store,
    )
    assert out.allocations[0].effective_bits <= 6.0
    assert {"artifacts/hf/model.safetensors", "artifacts/model.gguf", "artifacts/eval.json"} <= set(store.objects)
    report = out.eval_report
    assert report["teacher_forced"]["quantized"]["mean_kl"] >= 0.0
    # the same job on the CPU (float32) chooses from errors of the same size
    cpu = run_job(JobInputs(spec=spec(quantizer=quantizer), source=source, rows=ROWS[:9]), MemoryStore())
    for g, c in zip(out.profile.layers, cpu.profile.layers, strict=True):
        assert g.quant_error[4] == pytest.approx(c.quant_error[4], rel=0.1)
    assert torch.cuda.max_memory_allocated() < 1 << 30


def test_sequential_calibration_on_cuda(tiny_model_root: Path) -> None:
    source = resolve_model("tiny-llama", [tiny_model_root], {})
    out = run_job(
        JobInputs(
            spec=spec(quantizer="gptq", calibration_inputs="quantized", eval_fraction=None),
            source=source,
            rows=ROWS,
            device="cuda",
        ),
        MemoryStore(),
    )
    assert len(out.profile.layers) == 4
