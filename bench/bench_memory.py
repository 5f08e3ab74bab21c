"""The memory preflight against the measured peak of real jobs (not a timed test).

    python bench/bench_memory.py --model smollm2-135m-instruct --method taq --quantizer gptq --rows 64 [--eval]

Runs one job in this process with the worker's imports, a file-backed store and the worker's
per-stage peak-RSS tracking (worker/resources.py: the kernel's high-water mark, reset at each
stage), then prints one JSON line: the measured peak, the preflight estimate for the same job
(core.memory.estimate_job_memory with the arguments the API would pass) and their ratio. The
preflight is right when 1 ≤ estimate / measured ≤ 1.5 (tests/slow/test_memory_peak.py runs this
on the tiny model and SmolLM2; bench/bench_scale.py reports it for the 1B/8B shapes).

`--stop-after-layers N` cancels the job once the layer pass has finished N layers (a partial
run: an 8B-shaped GPTQ job takes hours on 2 cores, and every layer repeats the same peak); the
JSON then says `"partial"` and the peak covers the stages up to that point. `--store DIR` keeps
the job's store (layer checkpoints) in DIR instead of a deleted temporary directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.storage import FileStorage  # noqa: E402  stdlib only: the GPU check can run it
from core.data import split_rows  # noqa: E402
from core.errors import Cancelled  # noqa: E402
from core.memory import estimate_job_memory  # noqa: E402
from core.model_dims import read_model_dims  # noqa: E402
from core.models import resolve_model  # noqa: E402
from core.packaged_models import packaged_models  # noqa: E402
from core.pipeline import JobHooks, JobInputs, run_job  # noqa: E402
from core.spec import CalibrationRow, JobSpec  # noqa: E402
from core.weights import inspect_checkpoint  # noqa: E402
from worker.resources import PeakMemory, tune_allocator  # noqa: E402

TASKS = ROOT / "bench" / "tasks"


def _vm_hwm_bytes() -> int:
    """This process's RSS high-water mark since the last reset (the current stage's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MeasuringHooks(JobHooks):
    def __init__(self, stop_after_layers: int | None = None) -> None:
        self.memory = PeakMemory()
        self.seconds: dict[str, float] = {}
        self.stop_after_layers = stop_after_layers
        self.layers_done = 0
        self.layer_seconds: list[float] = []
        self._t0 = time.monotonic()

    def progress(self, stage: str, fraction: float, message: str) -> None:
        if message.startswith("layer ") and "/" in message.split()[1]:
            done = int(message.split()[1].split("/")[0])
            if done > self.layers_done:
                now = time.monotonic()
                self.layer_seconds.append(round(now - self._t0, 1))
                self._t0 = now
                self.layers_done = done
                print(
                    f"  {message}: {self.layer_seconds[-1]} s, peak RSS so far {_vm_hwm_bytes() / 2**30:.3f} GiB",
                    file=sys.stderr,
                    flush=True,
                )

    def should_cancel(self) -> bool:
        return self.stop_after_layers is not None and self.layers_done >= self.stop_after_layers

    @contextmanager
    def stage(self, name: str, *, skipped: bool, reason: str):
        t0 = time.monotonic()
        self.memory.start(name)
        try:
            yield
        finally:
            self.memory.stop(name)
            self.seconds[name] = round(time.monotonic() - t0, 2)


def measure(args: argparse.Namespace) -> dict:
    import torch

    if args.worker_imports:
        import worker.stages  # noqa: F401  the worker's imports (Celery, SQLAlchemy, ...) count in its RSS

    torch.set_num_threads(args.threads)
    rows = [
        CalibrationRow.model_validate_json(line)
        for line in (TASKS / args.suite / "calibration.jsonl").read_text().splitlines()
        if line.strip()
    ][: args.rows]
    source = resolve_model(args.model, [Path(r) for r in args.model_root], packaged_models())
    spec = JobSpec(
        model=args.model,
        method=args.method,
        calibration_dataset_id="bench",
        bit_budget={"avg_bits": args.budget},
        bit_choices=[4, 8, 16],
        group_size=128,
        max_tokens=args.max_tokens,
        max_calibration_rows=len(rows),
        quantizer=args.quantizer,
        exports=["hf", "gguf"],
        eval_fraction=0.25 if args.eval else None,
        seed=0,
    )
    calibration, evaluation = (rows, [])
    if args.eval:
        split = split_rows(rows, 0.25, 0)
        calibration, evaluation = split.calibration, split.evaluation
    hooks = MeasuringHooks(args.stop_after_layers)
    partial = None
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        store = FileStorage(Path(args.store) if args.store else Path(tmp) / "objects")  # the embedded worker's storage
        t0 = time.monotonic()
        try:
            run_job(
                JobInputs(
                    spec=spec,
                    source=source,
                    rows=calibration,
                    eval_rows=evaluation,
                    activation_ram_bytes=args.activation_ram,
                    work_dir=Path(tmp) / "work",
                    memory_limit_bytes=args.memory_limit,
                    device=args.device,
                ),
                store,
                hooks,
            )
        except Cancelled:
            if args.stop_after_layers is None:
                raise
            partial = f"stopped after {hooks.layers_done} layers of the layer pass"
        wall = time.monotonic() - t0
    summary = inspect_checkpoint(source.path, gguf_file=source.gguf_file)
    source_bytes = 2 if set(summary.dtypes) <= {"BF16", "F16"} else 4
    cuda = args.device == "cuda"
    estimate = estimate_job_memory(
        read_model_dims(source),
        method=args.method,
        calibration_rows=len(calibration),
        max_tokens=args.max_tokens,
        evaluates=args.eval,
        quantizer=args.quantizer,
        eval_rows=len(evaluation),
        activation_ram_bytes=args.activation_ram,
        generation=args.eval,
        source_bytes=source_bytes,
        gguf_source=bool(source.gguf_file),
        weight_bytes=2 if cuda else 4,
        batch_tokens=16384 if cuda else 2048,
    )
    by_stage = hooks.memory.gpu_by_stage if cuda else hooks.memory.by_stage
    peak = max(by_stage.values())
    return {
        "model": args.model,
        "method": args.method,
        "quantizer": args.quantizer,
        "rows": len(calibration),
        "eval_rows": len(evaluation),
        "wall_s": round(wall, 1),
        "peak_bytes": peak,
        "estimate_bytes": estimate.total_bytes,
        "ratio": round(estimate.total_bytes / peak, 3),
        "estimate_phase": estimate.phase,
        "per_stage_reset": hooks.memory.exact,
        "device": args.device,
        "peak_rss_by_stage_gib": {k: round(v / 2**30, 3) for k, v in hooks.memory.by_stage.items()},
        "peak_gpu_by_stage_gib": {k: round(v / 2**30, 3) for k, v in hooks.memory.gpu_by_stage.items()},
        "estimate_phases_gib": {k: round(v / 2**30, 3) for k, v in estimate.phases.items()},
        "seconds": hooks.seconds,
        "layer_seconds": hooks.layer_seconds,
        "partial": partial,
        "estimate_terms_gib": {k: round(v / 2**30, 3) for k, v in estimate.breakdown.items()},
        "command": " ".join(sys.argv),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--model-root", nargs="*", default=[str(ROOT / "bench" / "out" / "scale")])
    parser.add_argument("--method", default="taq", choices=["taq", "taq_kl", "taqo", "uniform"])
    parser.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq"])
    parser.add_argument("--suite", default="capitals")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--budget", type=float, default=4.5)
    parser.add_argument("--eval", action="store_true", help="hold out a quarter of the rows and evaluate")
    parser.add_argument("--activation-ram", type=int, default=1 << 30)
    parser.add_argument("--memory-limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None, help="directory for the job's store and scratch files")
    parser.add_argument(
        "--stop-after-layers",
        type=int,
        default=None,
        help="cancel the job after this many layers of the layer pass (a partial run)",
    )
    parser.add_argument("--store", default=None, help="keep the job's store (layer checkpoints) here")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: peaks are torch.cuda.max_memory_allocated per stage",
    )
    parser.add_argument(
        "--no-worker-imports",
        dest="worker_imports",
        action="store_false",
        help="do not import the worker's modules first (a machine with core's packages only)",
    )
    args = parser.parse_args(argv)
    tune_allocator()  # as `taq worker` does before it takes jobs
    print(json.dumps(measure(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
