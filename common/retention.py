"""What a tenant keeps: listing and deleting datasets and finished jobs, and the retention pass
that removes what is older than ``TAQ_RETENTION_DAYS`` (the per-tenant quotas are admission
limits, ``common.limits``). Storage is not allowed to grow forever."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from common.datasets import get_dataset
from common.errors import Conflict
from common.job_status import FINISHED_STATUSES, JobStatus
from common.jobs import get_job
from common.lifecycle import purge_job_outputs
from common.orm import Dataset, Job, utcnow
from common.pagination import keyset_page, page_size
from common.settings import Settings
from common.storage import Storage

log = logging.getLogger(__name__)

ACTIVE = (JobStatus.queued, JobStatus.running)


# ---- datasets --------------------------------------------------------------------------------
def list_datasets(
    session: Session, settings: Settings, tenant: str, *, limit: int | None = None, cursor: str | None = None
) -> tuple[list[Dataset], str | None]:
    """Newest first, keyset-paginated on (created_at, id) like the jobs."""
    limit = page_size(settings, limit)
    return keyset_page(session, select(Dataset).where(Dataset.tenant == tenant), Dataset, limit, cursor)


def jobs_using(session: Session, tenant: str, dataset_id: str) -> list[str]:
    """Queued or running jobs of the tenant whose spec names the dataset."""
    active = session.execute(select(Job.id, Job.spec).where(Job.tenant == tenant, Job.status.in_(ACTIVE))).all()
    return [
        job_id
        for job_id, spec in active
        if dataset_id in (spec.get("calibration_dataset_id"), spec.get("eval_dataset_id"))
    ]


def delete_dataset(session: Session, storage: Storage, tenant: str, dataset_id: str) -> None:
    """Remove the dataset (409 ``dataset_in_use`` while a queued or running job reads it). The
    stored file is content-addressed and may be shared with another tenant's identical upload: it
    is removed with its last reference."""
    row = get_dataset(session, tenant, dataset_id)
    users = jobs_using(session, tenant, dataset_id)
    if users:
        raise Conflict(
            f"dataset '{dataset_id}' is used by {len(users)} queued or running job(s); cancel them or "
            "wait until they finish",
            details={"jobs": users[:20]},
            code="dataset_in_use",
        )
    key, digest = row.storage_key, row.sha256
    session.delete(row)
    session.commit()
    if not session.scalar(select(func.count()).select_from(Dataset).where(Dataset.sha256 == digest)):
        storage.delete(key)
    log.info("dataset deleted", extra={"dataset_id": dataset_id, "tenant": tenant})


# ---- jobs ------------------------------------------------------------------------------------
def delete_job(session: Session, storage: Storage, tenant: str, job_id: str) -> None:
    """Remove a finished job: its artifacts from storage, then its rows (events, profile,
    artifacts cascade). A queued or running job is a 409: cancel it first."""
    job = get_job(session, tenant, job_id)
    if job.status in ACTIVE:
        raise Conflict(
            f"job '{job_id}' is {job.status}; cancel it and delete it once it has stopped",
            details={"status": job.status},
            code="job_not_finished",
        )
    _remove_job(session, storage, job_id)
    log.info("job deleted", extra={"job_id": job_id, "tenant": tenant})


def _remove_job(session: Session, storage: Storage, job_id: str) -> None:
    purge_job_outputs(session, storage, job_id)
    session.execute(delete(Job).where(Job.id == job_id, Job.status.in_(FINISHED_STATUSES)))
    session.commit()


# ---- retention -------------------------------------------------------------------------------
@dataclass
class RetentionReport:
    jobs: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)


def retention_pass(session: Session, settings: Settings, storage: Storage, *, batch: int = 200) -> RetentionReport:
    """Delete finished jobs that finished, and unused datasets created, more than
    TAQ_RETENTION_DAYS ago (nothing when it is unset). Runs in the workers' reaper loop."""
    report = RetentionReport()
    if settings.retention_days is None:
        return report
    cutoff = utcnow() - timedelta(days=settings.retention_days)
    old_jobs = (
        session.execute(select(Job.id).where(Job.status.in_(FINISHED_STATUSES), Job.finished_at < cutoff).limit(batch))
        .scalars()
        .all()
    )
    for job_id in old_jobs:
        _remove_job(session, storage, job_id)
        report.jobs.append(job_id)
    old_datasets = session.execute(
        select(Dataset.id, Dataset.tenant).where(Dataset.created_at < cutoff).limit(batch)
    ).all()
    for dataset_id, tenant in old_datasets:
        try:
            delete_dataset(session, storage, tenant, dataset_id)
            report.datasets.append(dataset_id)
        except Conflict:  # still read by a queued or running job: a later pass takes it
            session.rollback()
    if report.jobs or report.datasets:
        log.info("retention", extra={"jobs": report.jobs, "datasets": report.datasets, "days": settings.retention_days})
    return report
