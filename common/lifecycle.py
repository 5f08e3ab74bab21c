"""Job state transitions shared by the worker, the reaper and the API.

queued → running → succeeded | failed | cancelled. A worker owns a running row through its
``claim_token``; every write it makes is conditional on still owning it, so a worker that was
presumed dead (stale heartbeat, job requeued) cannot overwrite its successor.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from common.job_status import JobStatus
from common.orm import JOB_TABLE, Artifact, Job, JobEvent, ProfileLayer, StageRun, rowcount, utcnow
from common.settings import Settings
from common.storage import Storage

log = logging.getLogger(__name__)


def add_event(
    session: Session,
    job_id: str,
    kind: str,
    *,
    status: str | None = None,
    stage: str | None = None,
    progress: float | None = None,
    message: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    session.add(
        JobEvent(
            job_id=job_id,
            created_at=utcnow(),
            kind=kind,
            status=status,
            stage=stage,
            progress=progress,
            message=message,
            data=data,
        )
    )


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def purge_job_outputs(session: Session, storage: Storage, job_id: str) -> int:
    """Remove every stored file and artifact/profile row of a job (cancel, cleanup)."""
    removed = storage.delete_prefix(job_prefix(job_id))
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    session.execute(delete(ProfileLayer).where(ProfileLayer.job_id == job_id))
    return removed


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    attempt: int
    spec: dict[str, Any]
    tenant: str
    #: the worker class the job was routed to (None: a job from before classes existed)
    worker_class: str | None = None


def claim_job(session: Session, settings: Settings, job_id: str) -> Claim | None:
    """Atomically take a queued job (or a running one whose owner stopped heart-beating)."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_seconds)
    token = secrets.token_hex(16)
    table = JOB_TABLE
    claimed = rowcount(
        session.execute(
            update(table)
            .where(
                table.c.id == job_id,
                table.c.cancel_requested.is_(False),
                (table.c.status == JobStatus.queued)
                | ((table.c.status == JobStatus.running) & (table.c.heartbeat_at < stale)),
            )
            .values(
                status=JobStatus.running,
                claim_token=token,
                attempts=table.c.attempts + 1,
                heartbeat_at=now,
                updated_at=now,
                worker=worker_name(),
                error_code=None,
                error_message=None,
                error_details=None,
            )
        )
    )
    if not claimed:
        session.rollback()
        return None
    job = session.get(Job, job_id)
    assert job is not None  # the row was just claimed
    if job.started_at is None:
        job.started_at = now
    add_event(
        session,
        job_id,
        "status",
        status=JobStatus.running,
        stage=job.stage,
        message=f"attempt {job.attempts} started on {worker_name()}",
        data={"attempt": job.attempts},
    )
    session.commit()
    return Claim(job_id, token, job.attempts, dict(job.spec), job.tenant, job.worker_class)


def _owned(job_id: str, token: str) -> ColumnElement[bool]:
    table = JOB_TABLE
    return (table.c.id == job_id) & (table.c.claim_token == token) & (table.c.status == JobStatus.running)


def _transition(
    session: Session,
    job_id: str,
    where: ColumnElement[bool],
    values: dict[str, Any],
    *,
    message: str,
    progress: float | None = None,
    data: dict[str, Any] | None = None,
) -> bool:
    """Write `values` (with the new ``status``) to the job row if `where` still holds, and when it
    did, record the status event; False when the row had moved on. The caller commits."""
    changed = bool(rowcount(session.execute(update(JOB_TABLE).where(where).values(**values))))
    if changed:
        add_event(session, job_id, "status", status=values["status"], progress=progress, message=message, data=data)
    return changed


def heartbeat(session: Session, job_id: str, token: str) -> bool:
    now = utcnow()
    table = JOB_TABLE
    ok = rowcount(session.execute(update(table).where(_owned(job_id, token)).values(heartbeat_at=now)))
    session.commit()
    return bool(ok)


def still_owned_and_wanted(session: Session, job_id: str, token: str) -> tuple[bool, bool]:
    """(owned, cancel_requested)."""
    row = session.execute(select(Job.claim_token, Job.status, Job.cancel_requested).where(Job.id == job_id)).first()
    session.commit()
    if row is None:
        return False, True
    return (row.claim_token == token and row.status == JobStatus.running), bool(row.cancel_requested)


def set_progress(
    session: Session,
    job_id: str,
    token: str,
    *,
    stage: str | None,
    progress: float,
    event: tuple[str, str | None] | None = None,
) -> bool:
    """Write stage/progress; optionally an event (kind, message). False when no longer owned."""
    table = JOB_TABLE
    values: dict[str, Any] = {"progress": round(max(0.0, min(1.0, progress)), 4), "heartbeat_at": utcnow()}
    if stage is not None:
        values["stage"] = stage
    ok = rowcount(session.execute(update(table).where(_owned(job_id, token)).values(**values)))
    if ok and event is not None:
        kind, message = event
        add_event(
            session, job_id, kind, status=JobStatus.running, stage=stage, progress=values["progress"], message=message
        )
    session.commit()
    return bool(ok)


def record_stage_run(
    session: Session, job_id: str, stage: str, attempt: int, started: datetime, *, outcome: str, skipped: bool = False
) -> None:
    finished = utcnow()
    session.add(
        StageRun(
            job_id=job_id,
            stage=stage,
            attempt=attempt,
            started_at=started,
            finished_at=finished,
            duration_s=(finished - started).total_seconds(),
            skipped=skipped,
            outcome=outcome,
        )
    )
    session.commit()


def finish_job(
    session: Session,
    job_id: str,
    token: str,
    status: str,
    *,
    result: dict[str, Any] | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    error_details: Any = None,
    message: str | None = None,
) -> bool:
    now = utcnow()
    values: dict[str, Any] = {"status": status, "finished_at": now, "updated_at": now, "claim_token": None}
    if status == JobStatus.succeeded:
        values.update(progress=1.0, stage="publish", result=result)
    if error_code is not None:
        values.update(error_code=error_code, error_message=error_message, error_details=error_details)
    ok = _transition(
        session,
        job_id,
        _owned(job_id, token),
        values,
        message=message or error_message or status,
        progress=1.0 if status == JobStatus.succeeded else None,
        data={"error_code": error_code} if error_code else None,
    )
    session.commit()
    return ok


def release_for_retry(session: Session, job_id: str, token: str, reason: str) -> bool:
    """Give a claimed job back to the queue after a transient error (the task then retries)."""
    now = utcnow()
    values = {"status": JobStatus.queued, "claim_token": None, "updated_at": now, "enqueued_at": now}
    ok = _transition(session, job_id, _owned(job_id, token), values, message=f"retrying: {reason}")
    session.commit()
    return ok


def cancel_queued(session: Session, job_id: str) -> bool:
    """Cancel a job that has not started: queued → cancelled at once (False when it is not queued)."""
    now = utcnow()
    queued = (JOB_TABLE.c.id == job_id) & (JOB_TABLE.c.status == JobStatus.queued)
    values = {
        "status": JobStatus.cancelled,
        "cancel_requested": True,
        "finished_at": now,
        "updated_at": now,
        "stage": None,
    }
    return _transition(session, job_id, queued, values, message="cancelled before it started")


def request_cancel(session: Session, job_id: str) -> bool:
    """Flag a running job for its worker, which stops between layers and finishes it as cancelled
    (False when it is not running). The status changes only when the worker acts on the flag."""
    flagged = rowcount(
        session.execute(
            update(JOB_TABLE)
            .where(JOB_TABLE.c.id == job_id, JOB_TABLE.c.status == JobStatus.running)
            .values(cancel_requested=True, updated_at=utcnow())
        )
    )
    return bool(flagged)


# ---- reaper ----------------------------------------------------------------------------------
@dataclass
class ReapReport:
    requeued: list[str]
    reenqueued: list[str]
    failed: list[str]
    cancelled: list[str]


def reap(
    session: Session, settings: Settings, storage: Storage, enqueue: Callable[[str, str | None], None]
) -> ReapReport:
    """Requeue running jobs whose worker stopped heart-beating (or fail them after
    ``max_attempts``), finish cancelled ones, and re-send queued jobs the broker may have lost.
    ``enqueue(job_id, worker_class)`` sends a job to its own class's queue."""
    report = ReapReport([], [], [], [])
    now = utcnow()
    table = JOB_TABLE
    stale = now - timedelta(seconds=settings.stale_after_seconds)
    for job in (
        session.execute(select(Job).where(Job.status == JobStatus.running, Job.heartbeat_at < stale)).scalars().all()
    ):
        guard = (table.c.id == job.id) & (table.c.status == JobStatus.running) & (table.c.heartbeat_at < stale)
        finished: dict[str, Any] = {"finished_at": now, "updated_at": now, "claim_token": None}
        if job.cancel_requested:
            values: dict[str, Any] = {"status": JobStatus.cancelled, **finished}
            if _transition(session, job.id, guard, values, message="cancelled (worker lost while stopping)"):
                session.commit()
                purge_job_outputs(session, storage, job.id)
                report.cancelled.append(job.id)
        elif job.attempts >= settings.max_attempts:
            message = f"worker lost {job.attempts} times; giving up"
            values = {"status": JobStatus.failed, **finished, "error_code": "worker_lost", "error_message": message}
            if _transition(session, job.id, guard, values, message=message, data={"error_code": "worker_lost"}):
                report.failed.append(job.id)
        else:
            values = {"status": JobStatus.queued, "claim_token": None, "updated_at": now, "enqueued_at": now}
            if _transition(session, job.id, guard, values, message="requeued: the worker stopped heart-beating"):
                report.requeued.append(job.id)
        session.commit()
    lost = now - timedelta(seconds=settings.requeue_queued_after_seconds)
    never_sent = (Job.enqueued_at.is_(None)) & (Job.created_at < now - timedelta(seconds=10))
    old = (
        session.execute(select(Job.id).where(Job.status == JobStatus.queued, never_sent | (Job.enqueued_at < lost)))
        .scalars()
        .all()
    )
    for job_id in old:
        if rowcount(
            session.execute(
                update(table)
                .where(
                    (table.c.id == job_id)
                    & (table.c.status == JobStatus.queued)
                    & (table.c.enqueued_at.is_(None) | (table.c.enqueued_at < lost))
                )
                .values(enqueued_at=now)
            )
        ):
            report.reenqueued.append(job_id)
        session.commit()
    classes = (
        dict(
            session.execute(
                select(Job.id, Job.worker_class).where(Job.id.in_(report.requeued + report.reenqueued))
            ).all()
        )
        if report.requeued or report.reenqueued
        else {}
    )
    for job_id in report.requeued + report.reenqueued:
        try:
            enqueue(job_id, classes.get(job_id))
        except Exception as exc:  # broker down: mark it never sent, so the next pass tries again
            log.warning("re-enqueue failed", extra={"job_id": job_id, "error": repr(exc)})
            session.execute(
                update(table)
                .where((table.c.id == job_id) & (table.c.status == JobStatus.queued) & (table.c.enqueued_at == now))
                .values(enqueued_at=None)
            )
            session.commit()
    if any((report.requeued, report.reenqueued, report.failed, report.cancelled)):
        log.info(
            "reaper",
            extra={
                "requeued": report.requeued,
                "reenqueued": report.reenqueued,
                "failed": report.failed,
                "cancelled": report.cancelled,
            },
        )
    return report
