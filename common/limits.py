"""Admission limits checked before anything is stored or queued: dataset rows, prompt length, and
the per-tenant quotas (datasets, jobs, stored bytes) and the memory preflight of a job. Each
refusal (a 422; 413 or 429 for the quotas) names the limit, its ``TAQ_`` setting and how to get
under it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.errors import InvalidParameter, PayloadTooLarge, TooManyRequests
from common.orm import Artifact, Dataset, Job
from common.settings import Settings
from core.spec import CalibrationRow, JobSpec

if TYPE_CHECKING:
    from core.memory import MemoryEstimate

log = logging.getLogger(__name__)

GiB = 1 << 30
#: offending rows listed in an error's details (as core.data.MAX_REPORTED_ERRORS)
MAX_REPORTED = 20


# ---- datasets --------------------------------------------------------------------------------
def nonblank_line_numbers(data: bytes) -> list[int]:
    """1-based numbers of the non-blank lines: row i of core.data.parse_jsonl is on line [i]."""
    return [n for n, raw in enumerate(data.split(b"\n"), start=1) if raw.strip()]


def check_dataset_rows(settings: Settings, n_rows: int) -> None:
    limit = settings.max_dataset_rows
    if n_rows > limit:
        raise InvalidParameter(
            f"the dataset has {n_rows} rows; the limit is {limit} (TAQ_MAX_DATASET_ROWS); split it or "
            "ask the operator to raise TAQ_MAX_DATASET_ROWS",
            details={"rows": n_rows, "limit": limit},
            code="too_many_rows",
        )


def _prompt_bytes(row: CalibrationRow) -> int:
    if row.prompt is not None:
        return len(row.prompt.encode("utf-8"))
    return sum(len(m.content.encode("utf-8")) + len(m.role.encode("utf-8")) for m in row.messages or [])


def check_prompt_sizes(
    settings: Settings, rows: Sequence[CalibrationRow], lines: Sequence[int] | None = None, where: str = "line"
) -> None:
    """Refuse rows whose prompt (or one of whose answers) may exceed TAQ_MAX_PROMPT_TOKENS.

    No tokenizer is known at upload, so tokens are bounded by UTF-8 bytes: byte-level BPE and
    byte-fallback SentencePiece never emit more than one token per byte (the chat template adds
    a few tokens per message on top). Every accepted row therefore has at most that many tokens;
    typical text is ~4 bytes a token, so at the default (32768) a row holds ~8k real tokens, the
    most a job reads per prompt (`max_tokens` ≤ 8192)."""
    limit = settings.max_prompt_tokens
    bad: list[dict[str, Any]] = []
    count = 0
    for i, row in enumerate(rows):
        number = lines[i] if lines is not None else i + 1
        sizes = [("prompt" if row.prompt is not None else "messages", _prompt_bytes(row))]
        sizes += [(f"answers[{j}]", len(a.encode("utf-8"))) for j, a in enumerate(row.answers or [])]
        for fld, size in sizes:
            if size > limit:
                count += 1
                if len(bad) < MAX_REPORTED:
                    bad.append({where: number, "field": fld, "bytes": size, "limit": limit})
    if bad:
        first = bad[0]
        raise InvalidParameter(
            f"{count} prompt{'s' if count != 1 else ''} over the limit; {where} {first[where]}: "
            f"{first['field']} is {first['bytes']} UTF-8 bytes, which may be up to {first['bytes']} tokens, "
            f"over TAQ_MAX_PROMPT_TOKENS={limit} (counted as UTF-8 bytes, an upper bound on tokens, because "
            "data is checked without a model's tokenizer); shorten it or ask the operator to raise "
            "TAQ_MAX_PROMPT_TOKENS",
            details=bad,
            code="prompt_too_long",
        )


# ---- per-tenant quotas -----------------------------------------------------------------------
def stored_bytes(session: Session, tenant: str) -> int:
    """Bytes a tenant keeps in storage: its datasets and its jobs' artifacts."""
    datasets = session.scalar(select(func.coalesce(func.sum(Dataset.size), 0)).where(Dataset.tenant == tenant))
    artifacts = session.scalar(
        select(func.coalesce(func.sum(Artifact.size), 0))
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.tenant == tenant)
    )
    return int(datasets or 0) + int(artifacts or 0)


def job_disk_bytes(source: Any, spec: JobSpec) -> int:
    """The object storage a job will write (core.disk), 0 when the model's shapes are unreadable."""
    from core.disk import estimate_job_disk, group_bytes
    from core.model_dims import read_model_dims

    try:
        dims = read_model_dims(source)
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return estimate_job_disk(
        dims,
        bit_choices=list(spec.bit_choices),
        group_size=spec.scheme.smallest_group_size,  # the most scales: an upper bound
        budgets=list(spec.budgets),
        formats=len(spec.exports),
        group_param_bytes=group_bytes(float_zero=spec.scheme.float_zero, k_quants=spec.scheme.k_quants),
    ).total_bytes


def check_storage_quota(session: Session, settings: Settings, tenant: str, adding: int = 0) -> None:
    """413 ``storage_quota`` when the tenant's stored bytes plus `adding` (a dataset's size, or a
    job's disk estimate: every budget's export in every format and the layer checkpoints) exceed
    TAQ_MAX_STORED_BYTES_PER_TENANT."""
    limit = settings.max_stored_bytes_per_tenant
    used = stored_bytes(session, tenant)
    if used + adding > limit or (not adding and used >= limit):
        raise PayloadTooLarge(
            f"tenant '{tenant}' stores {used} bytes (+{adding} new) and the limit is {limit} "
            "(TAQ_MAX_STORED_BYTES_PER_TENANT); delete datasets or finished jobs "
            "(DELETE /v1/datasets/{id}, DELETE /v1/jobs/{id})",
            details={"stored_bytes": used, "adding": adding, "limit": limit},
            code="storage_quota",
        )


def _check_count(
    session: Session, tenant: str, model: Any, limit: int, *, noun: str, setting: str, advice: str, code: str
) -> None:
    """429 `code` when the tenant already keeps `limit` rows of `model`."""
    count = session.scalar(select(func.count()).select_from(model).where(model.tenant == tenant)) or 0
    if count >= limit:
        raise TooManyRequests(
            f"tenant '{tenant}' already has {count} {noun} ({setting}={limit}); {advice}",
            details={"limit": limit, noun: count},
            code=code,
        )


def check_dataset_quota(session: Session, settings: Settings, tenant: str) -> None:
    _check_count(
        session,
        tenant,
        Dataset,
        settings.max_datasets_per_tenant,
        noun="datasets",
        setting="TAQ_MAX_DATASETS_PER_TENANT",
        advice="delete some with DELETE /v1/datasets/{id}",
        code="dataset_limit",
    )


def check_job_quota(session: Session, settings: Settings, tenant: str) -> None:
    _check_count(
        session,
        tenant,
        Job,
        settings.max_jobs_per_tenant,
        noun="jobs",
        setting="TAQ_MAX_JOBS_PER_TENANT",
        advice="delete finished ones with DELETE /v1/jobs/{id}",
        code="job_limit",
    )


# ---- jobs: memory preflight ------------------------------------------------------------------
def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def estimate_for_spec(
    settings: Settings,
    source: Any,
    spec: JobSpec,
    calibration_rows: int,
    *,
    eval_rows: int = 0,
    checkpoint: Any = None,
    limit_bytes: int | None = None,
    device: str | None = None,
) -> MemoryEstimate | None:
    """core.memory.estimate_job_memory for this spec on a worker of `device` (default:
    TAQ_WORKER_DEVICE), or None when the model's shapes cannot be read (the job is then admitted;
    the worker reports any failure). Greedy generation is counted only when the whole model fits
    `limit_bytes` (the worker skips it otherwise)."""
    from core.memory import CPU_BATCH_TOKENS, CUDA_BATCH_TOKENS, GENERATING_METHODS, estimate_job_memory
    from core.model_dims import read_model_dims
    from core.spec import CalibrationInputs

    try:
        dims = read_model_dims(source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning(
            "memory preflight skipped: model shapes unreadable", extra={"model": spec.model, "error": repr(exc)}
        )
        return None
    cuda = (device or settings.worker_device) == "cuda"
    evaluates = spec.eval_dataset_id is not None or spec.eval_fraction is not None
    dtypes = getattr(checkpoint, "dtypes", None) or {}
    source_bytes = 2 if dtypes and set(dtypes) <= {"BF16", "F16"} else 4
    options: dict[str, Any] = dict(
        method=spec.method.value,
        calibration_rows=min(calibration_rows, spec.max_calibration_rows),
        max_tokens=spec.max_tokens,
        evaluates=evaluates,
        weight_bytes=2 if cuda else 4,
        batch_tokens=CUDA_BATCH_TOKENS if cuda else CPU_BATCH_TOKENS,
        quantizer=spec.quantizer.value,
        widths=len([b for b in spec.bit_choices if b < 16]),
        sequential=spec.calibration_inputs == CalibrationInputs.quantized,
        eval_rows=eval_rows,
        budgets=len(spec.budgets) or 1,
        activation_ram_bytes=settings.activation_ram_bytes,
        group_size=spec.scheme.smallest_group_size,  # the most scales: an upper bound
        source_bytes=source_bytes,
        gguf_source=bool(getattr(source, "gguf_file", None)),
        closed_loop=spec.closed_loop,
    )
    if spec.method.value in GENERATING_METHODS:  # it cannot run without generating: always counted
        return estimate_job_memory(dims, **options, generation=True)
    estimate = estimate_job_memory(dims, **options)
    if evaluates and limit_bytes is not None and estimate.generation_bytes + estimate.runtime_bytes <= limit_bytes:
        estimate = estimate_job_memory(dims, **options, generation=True)
    return estimate


def route_job(
    settings: Settings, source: Any, spec: JobSpec, calibration_rows: int, *, eval_rows: int = 0, checkpoint: Any = None
) -> str:
    """The worker class a job goes to: the pinned one (``spec.worker_class``) when it holds the job,
    else the smallest class (TAQ_WORKER_CLASSES, ordered by memory) whose memory holds the
    estimate made for that class's device. Refusals are 422 ``job_too_large`` naming the estimate
    and the class; an undeclared pinned class is 422 ``unknown_worker_class``."""
    fleet = settings.fleet()
    candidates = fleet
    if spec.worker_class is not None:
        pinned = settings.find_worker_class(spec.worker_class)
        if pinned is None:
            raise InvalidParameter(
                f"worker_class '{spec.worker_class}' is not a class of this deployment; declared: "
                + ", ".join(
                    f"{c.name} ({c.device}, {_gib(c.memory_bytes) if c.memory_bytes else 'memory unknown'})"
                    for c in fleet
                ),
                details={"worker_class": spec.worker_class, "declared": [c.name for c in fleet]},
                code="unknown_worker_class",
            )
        candidates = [pinned]
    estimate = None
    for worker_class in candidates:
        if worker_class.memory_bytes is None:
            return worker_class.name  # memory unknown: admitted, as without a limit
        estimate = estimate_for_spec(
            settings,
            source,
            spec,
            calibration_rows,
            eval_rows=eval_rows,
            checkpoint=checkpoint,
            limit_bytes=worker_class.memory_bytes,
            device=worker_class.device,
        )
        if estimate is None:  # shapes unreadable: the largest class has the best chance
            return candidates[-1].name
        if estimate.total_bytes <= worker_class.memory_bytes:
            return worker_class.name
    assert estimate is not None
    refuse_too_large(candidates[-1], estimate, pinned=spec.worker_class is not None, several=len(fleet) > 1)


def refuse_too_large(worker_class: Any, estimate: Any, *, pinned: bool, several: bool) -> NoReturn:
    limit_bytes, source = worker_class.memory_bytes, worker_class.memory_source
    parts = ", ".join(f"{name} {_gib(n)}" for name, n in estimate.breakdown.items() if n)
    if pinned:
        where = f"the pinned worker class '{worker_class.name}' has {_gib(limit_bytes)} ({source})"
        advice = "pin a larger class or none (the service then picks the smallest class that holds the job)"
    elif several:
        where = f"the largest worker class, '{worker_class.name}', has {_gib(limit_bytes)} ({source})"
        advice = "add a larger worker class to TAQ_WORKER_CLASSES"
    else:
        where = f"the limit is {_gib(limit_bytes)} ({source})"
        advice = "run larger workers and raise TAQ_WORKER_MEMORY_BYTES (or declare TAQ_WORKER_CLASSES)"
    raise InvalidParameter(
        f"job needs about {_gib(estimate.total_bytes)} of worker memory ({parts}) but {where}; lower "
        f"max_tokens or max_calibration_rows, use a smaller model, or {advice}",
        details={
            "estimate_bytes": estimate.total_bytes,
            "limit_bytes": limit_bytes,
            "limit_source": source,
            "worker_class": worker_class.name,
            "device": worker_class.device,
            "breakdown": estimate.breakdown,
            "phase": estimate.phase,
            "phases": estimate.phases,
            "parameters": estimate.parameters,
            "assumptions": estimate.assumptions,
        },
        code="job_too_large",
    )
