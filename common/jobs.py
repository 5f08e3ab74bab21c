"""Job service functions used by the API: submit (with idempotency), list, get, cancel, events,
profile and artifacts. Worker-side state transitions live in ``common.lifecycle``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common import broker, idempotency
from common.datasets import get_dataset
from common.errors import Conflict, InvalidParameter, NotFound, TooManyRequests
from common.idempotency import StoredResponse
from common.ids import new_id
from common.job_status import JobStatus
from common.lifecycle import add_event, cancel_queued, purge_job_outputs, request_cancel
from common.limits import check_job_quota, check_prompt_sizes, check_storage_quota, job_disk_bytes, route_job
from common.orm import JOB_TABLE, Artifact, IdempotencyKey, Job, JobEvent, ProfileLayer, utcnow
from common.pagination import keyset_page, page_size
from common.settings import Settings
from common.storage import Storage
from core.canonical_json import json_sha256
from core.errors import BudgetInfeasible, InvalidSpec
from core.spec import AllocationRule, JobSpec

if TYPE_CHECKING:
    from core.models import ModelSource
    from core.weights import CheckpointSummary

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = idempotency.MAX_IDEMPOTENCY_KEY


# ---- submit ----------------------------------------------------------------------------------
def spec_hash(spec: JobSpec) -> str:
    return json_sha256(spec.model_dump(mode="json"))


def check_budget_feasible(spec: JobSpec) -> None:
    """Model-independent lower bound: every layer at the smallest bit width."""
    if spec.allocation != AllocationRule.budget:
        return
    floor = spec.scheme.effective_bits(min(spec.bit_choices))
    too_low = [b for b in spec.budgets if b + 1e-9 < floor]
    if too_low:
        raise BudgetInfeasible(
            f"bit budget {too_low[0]} is below {floor:.4g}, the effective bits of every layer at "
            f"{min(spec.bit_choices)} bit ({spec.scheme.describe()}); raise avg_bits or allow fewer bits",
            details={"min_avg_bits": floor, "avg_bits": too_low},
        )


def check_checkpoint(source: ModelSource) -> CheckpointSummary | None:
    """The checkpoint's headers (never its data): a missing or truncated shard, a corrupt header,
    an index naming a file outside the model directory is a 422 ``model_invalid`` at submit."""
    from core.weights import inspect_checkpoint

    if source.weights_format == "pickle":
        return None
    return inspect_checkpoint(source.path, gguf_file=source.gguf_file)


def check_runtime_shapes(source: ModelSource, spec: JobSpec) -> None:
    """422 ``invalid_spec`` when the spec's target runtime cannot carry the model's linear shapes,
    read from its config (unreadable shapes: the worker's load stage checks the real linears)."""
    if spec.target_runtime is None:
        return
    from core.model_dims import read_model_dims
    from core.runtimes import check_shapes

    try:
        dims = read_model_dims(source)
    except (OSError, ValueError, KeyError, TypeError):
        return
    check_shapes(
        spec.target_runtime,
        in_features=dims.linear_in_features,
        group_sizes=spec.group_sizes,
        k_quant_widths=spec.k_quant_widths,
    )


def validate_references(session: Session, settings: Settings, tenant: str, spec: JobSpec) -> tuple[str, int]:
    """Everything a spec points at must exist for this tenant before the job is accepted.
    Returns the worker class the job is routed to (the memory preflight decides) and the bytes
    the job will store (core.disk)."""
    from common.model_registry import resolve_model

    source = resolve_model(settings, spec.model)  # ModelNotFound (404) / UnsafeModel (422)
    calibration_rows = 0
    if spec.calibration is not None:
        check_prompt_sizes(settings, spec.calibration, where="calibration_row")
        calibration_rows = len(spec.calibration)
    if spec.calibration_dataset_id is not None:
        calibration_rows = get_dataset(session, tenant, spec.calibration_dataset_id).rows
    eval_rows = 0
    if spec.eval_dataset_id is not None:
        eval_rows = get_dataset(session, tenant, spec.eval_dataset_id).rows
    elif spec.eval_fraction is not None:
        eval_rows = max(1, round(calibration_rows * spec.eval_fraction))
    if spec.profile_from_job_id is not None:
        prior = get_job(session, tenant, spec.profile_from_job_id)
        if prior.status != JobStatus.succeeded:
            raise InvalidSpec(f"job '{prior.id}' has no profile to reuse (status {prior.status})")
    check_budget_feasible(spec)
    summary = check_checkpoint(source)  # 422 model_invalid where the headers show it
    check_runtime_shapes(source, spec)
    worker_class = route_job(
        settings, source, spec, calibration_rows, eval_rows=eval_rows, checkpoint=summary
    )  # 422 job_too_large / unknown_worker_class
    return worker_class, job_disk_bytes(source, spec)


_sqlite_quota_lock = threading.Lock()


@contextmanager
def queue_quota_lock(session: Session, tenant: str) -> Iterator[None]:
    """Serialise "count the tenant's queued jobs, then insert one" so that concurrent submits
    cannot overshoot the quota: a transaction-scoped advisory lock per tenant on PostgreSQL
    (released by the commit or rollback that ends the insert), a process lock on SQLite (the
    embedded default runs one API process). Call it at the start of a fresh transaction."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"taq-queued:{tenant}"})
        yield
    else:
        with _sqlite_quota_lock:
            yield


def check_queue_quota(session: Session, settings: Settings, tenant: str) -> None:
    queued = (
        session.scalar(
            select(func.count()).select_from(Job).where(Job.tenant == tenant, Job.status == JobStatus.queued)
        )
        or 0
    )
    limit = settings.max_queued_jobs_per_tenant
    if queued >= limit:
        raise TooManyRequests(
            f"tenant '{tenant}' already has {queued} queued jobs (TAQ_MAX_QUEUED_JOBS_PER_TENANT={limit}); "
            "wait for some to start or cancel them",
            details={"limit": limit, "queued": queued},
            code="queued_job_limit",
        )


def submit_job(
    session: Session,
    settings: Settings,
    tenant: str,
    spec: JobSpec,
    render: Callable[[Job], dict[str, Any]],
    idempotency_key: str | None = None,
) -> StoredResponse:
    """Create a queued job and enqueue it. With an ``Idempotency-Key`` the first response is
    stored: the same key with the same spec replays it, with another spec it is a 409."""
    digest = spec_hash(spec)
    if idempotency_key is not None:
        idempotency.check_key(idempotency_key)
        replay = idempotency.replay(session, tenant, idempotency_key, digest, "job_id")
        if replay is not None:
            return replay
    worker_class, disk_bytes = validate_references(session, settings, tenant, spec)
    session.rollback()  # nothing written yet: the quota check and the insert get a fresh transaction
    with queue_quota_lock(session, tenant):
        stored = _insert_job(session, settings, tenant, spec, worker_class, render, idempotency_key, digest, disk_bytes)
    if not stored.replayed:
        _enqueue(session, settings, stored.resource_id, worker_class)
        log.info(
            "job submitted",
            extra={
                "job_id": stored.resource_id,
                "tenant": tenant,
                "method": spec.method.value,
                "worker_class": worker_class,
            },
        )
    return stored


def _insert_job(
    session: Session,
    settings: Settings,
    tenant: str,
    spec: JobSpec,
    worker_class: str,
    render: Callable[[Job], dict[str, Any]],
    idempotency_key: str | None,
    digest: str,
    disk_bytes: int,
) -> StoredResponse:
    check_queue_quota(session, settings, tenant)
    check_job_quota(session, settings, tenant)  # 429 job_limit
    check_storage_quota(session, settings, tenant, adding=disk_bytes)  # 413 storage_quota
    now = utcnow()
    job = Job(
        id=new_id("job"),
        tenant=tenant,
        status=JobStatus.queued,
        stage=None,
        progress=0.0,
        spec=spec.model_dump(mode="json"),
        created_at=now,
        updated_at=now,
        attempts=0,
        cancel_requested=False,
        worker_class=worker_class,
    )
    session.add(job)
    session.flush()
    add_event(
        session,
        job.id,
        "status",
        status=JobStatus.queued,
        message=f"job accepted for worker class '{worker_class}'",
        data={"worker_class": worker_class},
    )
    body = render(job)
    if idempotency_key is not None:
        session.add(
            IdempotencyKey(
                tenant=tenant, key=idempotency_key, request_hash=digest, job_id=job.id, status_code=202, response=body
            )
        )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        replay = idempotency.replay(session, tenant, idempotency_key, digest, "job_id") if idempotency_key else None
        if replay is None:
            raise
        return replay
    return StoredResponse(job.id, 202, body, replayed=False)


def _enqueue(session: Session, settings: Settings, job_id: str, worker_class: str) -> None:
    try:
        broker.enqueue_job(settings, job_id, worker_class)
        session.execute(JOB_TABLE.update().where(Job.id == job_id).values(enqueued_at=utcnow()))
        session.commit()
    except Exception as exc:  # the job is safe in the DB; the reaper enqueues it later
        session.rollback()
        log.warning("enqueue failed; the reaper will retry", extra={"job_id": job_id, "error": repr(exc)})


# ---- read ------------------------------------------------------------------------------------
def get_job(session: Session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant != tenant:
        raise NotFound(f"job '{job_id}' not found", code="job_not_found")
    return job


def list_jobs(
    session: Session,
    settings: Settings,
    tenant: str,
    *,
    status: Sequence[str] | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> tuple[list[Job], str | None]:
    """Newest first, keyset-paginated on (created_at, id)."""
    limit = page_size(settings, limit)
    query = select(Job).where(Job.tenant == tenant)
    if status:
        bad = sorted(set(status) - set(JobStatus))
        if bad:
            raise InvalidParameter(f"unknown status {bad}; use one of {[s.value for s in JobStatus]}")
        query = query.where(Job.status.in_(status))
    return keyset_page(session, query, Job, limit, cursor)


def cancel_job(session: Session, storage: Storage, tenant: str, job_id: str) -> Job:
    """Queued: cancelled at once. Running: flag for the worker (it stops between layers).
    Finished: 409."""
    job = get_job(session, tenant, job_id)
    if cancel_queued(session, job_id):
        session.commit()
        purge_job_outputs(session, storage, job_id)
        session.commit()
    else:
        if not request_cancel(session, job_id):
            session.refresh(job)
            raise Conflict(
                f"job '{job_id}' already finished ({job.status})", details={"status": job.status}, code="job_finished"
            )
        if not job.cancel_requested:
            add_event(session, job_id, "info", status=JobStatus.running, message="cancel requested")
        session.commit()
    session.refresh(job)
    return job


def list_events(session: Session, tenant: str, job_id: str, *, after: int = 0, limit: int = 1000) -> list[JobEvent]:
    get_job(session, tenant, job_id)
    return list(
        session.execute(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)
        ).scalars()
    )


def events_since(session: Session, job_id: str, after: int, limit: int = 1000) -> tuple[list[JobEvent], str]:
    """For the event stream: new events and the job's current status (tenant already checked)."""
    events = list(
        session.execute(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)
        ).scalars()
    )
    status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()
    return events, status


def get_profile(session: Session, tenant: str, job_id: str) -> tuple[Job, list[ProfileLayer]]:
    job = get_job(session, tenant, job_id)
    layers = list(
        session.execute(
            select(ProfileLayer).where(ProfileLayer.job_id == job_id).order_by(ProfileLayer.index)
        ).scalars()
    )
    if not layers:
        raise NotFound(
            f"job '{job_id}' has no profile yet (status {job.status}, stage {job.stage})", code="profile_not_ready"
        )
    return job, layers


def list_artifacts(session: Session, tenant: str, job_id: str) -> list[Artifact]:
    get_job(session, tenant, job_id)
    return list(session.execute(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)).scalars())


def get_artifact(session: Session, tenant: str, job_id: str, name: str) -> tuple[Artifact, dict[str, Any] | None]:
    """The artifact, or for ``dir/file`` inside a directory artifact: (the directory, the file entry)."""
    get_job(session, tenant, job_id)
    if name.endswith(".tar"):
        row = session.get(Artifact, (job_id, name[:-4]))
        if row is not None and row.kind == "directory":
            return row, None
    row = session.get(Artifact, (job_id, name))
    if row is not None:
        return row, None
    head, _, rest = name.partition("/")
    if rest:
        parent = session.get(Artifact, (job_id, head))
        if parent is not None and parent.kind == "directory":
            for entry in parent.files or []:
                if entry["name"] == rest:
                    return parent, entry
    raise NotFound(f"job '{job_id}' has no artifact '{name}'", code="artifact_not_found")
