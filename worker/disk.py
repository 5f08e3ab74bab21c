"""The worker's disk check, before a claimed job runs: what the job will write at once under the
work directory (``$TAQ_DATA_DIR/work``: spilled hidden states, export staging;
`core.disk.estimate_work_disk`, for the stages that will run) against that disk's free space.
A job that does not fit fails with ``insufficient_disk`` instead of filling the disk mid-run."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from core.disk import WORK_STAGES, WorkDiskEstimate, estimate_work_disk, group_bytes
from core.errors import InsufficientDisk
from core.pipeline import ArtifactStore, JobInputs, StagePlan
from core.spec import CalibrationInputs

log = logging.getLogger("taq.worker")

GiB = 1 << 30
#: how the messages name the work directory (never the server path)
WORK_DIR_NAME = "the worker's work directory ($TAQ_DATA_DIR/work)"

_ADVICE = {
    "layer pass": "raise TAQ_ACTIVATION_RAM_BYTES so that more hidden states stay in memory, lower "
    "max_calibration_rows or max_tokens, or use a method with one hidden stream (taq, uniform: taq_kl and "
    "taqo carry one per layer)",
    "evaluation": "raise TAQ_ACTIVATION_RAM_BYTES, or evaluate on fewer rows or budgets",
    "export": "export fewer formats or budgets per job",
}


def work_disk_estimate(inputs: JobInputs, store: ArtifactStore) -> WorkDiskEstimate | None:
    """The estimate for the stages this run will execute (a resumed job skips those whose output is
    stored), or None when the model's shapes are unreadable (the job then runs unchecked, as the
    submit's preflight admitted it)."""
    from core.model_dims import read_model_dims

    spec = inputs.spec
    try:
        dims = read_model_dims(inputs.source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("disk check skipped: model shapes unreadable", extra={"model": spec.model, "error": repr(exc)})
        return None
    plan = StagePlan.from_store(store, spec, reused_profile=inputs.reused_profile is not None)
    stages = {stage for stage in WORK_STAGES if plan.skip(stage) is None}
    return estimate_work_disk(
        dims,
        method=spec.method.value,
        calibration_rows=min(len(inputs.rows), spec.max_calibration_rows),
        max_tokens=spec.max_tokens,
        sequential=spec.calibration_inputs == CalibrationInputs.quantized,
        hidden_bytes=2 if inputs.device == "cuda" else 4,  # JobInputs.dtype None: bf16 on CUDA, else float32
        activation_ram_bytes=inputs.activation_ram_bytes,
        bit_choices=list(spec.bit_choices),
        group_size=spec.scheme.smallest_group_size,  # the most scales: an upper bound
        budgets=list(spec.budgets),
        formats=len(spec.exports),
        group_param_bytes=group_bytes(float_zero=spec.scheme.float_zero, k_quants=spec.scheme.k_quants),
        eval_rows=len(inputs.eval_rows),
        stages=stages,
    )


def check_work_disk(inputs: JobInputs, store: ArtifactStore) -> WorkDiskEstimate | None:
    """Raise InsufficientDisk (code ``insufficient_disk``) when the job's estimate exceeds the free
    space of the disk holding the work directory; returns the estimate."""
    estimate = work_disk_estimate(inputs, store)
    if estimate is None:
        return None
    work_dir = Path(inputs.work_dir or tempfile.gettempdir())
    work_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work_dir).free
    log.info("work disk", extra={"estimate": estimate.to_dict(), "free_bytes": free})
    refuse_without_room(estimate, free)
    return estimate


def refuse_without_room(estimate: WorkDiskEstimate, free_bytes: int) -> None:
    """InsufficientDisk naming the estimate by phase, the free space and what lowers the need."""
    if estimate.total_bytes <= free_bytes:
        return
    phase = estimate.phase or "layer pass"
    parts = ", ".join(f"{name} {n / GiB:.2f} GiB" for name, n in estimate.phases.items() if n)
    raise InsufficientDisk(
        f"the job needs about {estimate.total_bytes / GiB:.2f} GiB of free disk in {WORK_DIR_NAME} at its "
        f"peak ({parts}) but {free_bytes / GiB:.2f} GiB are free there; free space on that disk, or "
        f"{_ADVICE[phase]}",
        details={
            "estimate_bytes": estimate.total_bytes,
            "free_bytes": free_bytes,
            "phase": phase,
            "phases": estimate.phases,
            "where": "$TAQ_DATA_DIR/work",
        },
    )
