"""The worker fleet as the database sees it: each `taq worker` process keeps a row in `workers`
(class, device, memory, heartbeat) while it runs; the API lists the live ones and /metrics counts
queued jobs per class. Routing itself is Celery's (one queue per class, common.broker)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from common.job_status import JobStatus
from common.orm import Job, WorkerRow, rowcount, utcnow
from common.settings import Settings
from common.worker_classes import WorkerClass


@dataclass(frozen=True)
class LiveWorker:
    name: str
    worker_class: str
    device: str
    memory_bytes: int | None
    started_at: datetime
    heartbeat_at: datetime
    #: the job it is running now (its claim names this worker), or None when idle
    job_id: str | None


def register_worker(session: Session, name: str, worker_class: WorkerClass, device: str) -> None:
    """Insert or refresh this worker's row (a restarted process with the same host:pid replaces it)."""
    now = utcnow()
    session.execute(delete(WorkerRow).where(WorkerRow.name == name))
    session.add(
        WorkerRow(
            name=name,
            worker_class=worker_class.name,
            device=device,
            memory_bytes=worker_class.memory_bytes,
            started_at=now,
            heartbeat_at=now,
        )
    )
    session.commit()


def beat_worker(session: Session, name: str) -> bool:
    """Refresh the heartbeat; False when the row is gone (pruned while this worker was stalled)."""
    done = rowcount(session.execute(update(WorkerRow).where(WorkerRow.name == name).values(heartbeat_at=utcnow())))
    session.commit()
    return bool(done)


def unregister_worker(session: Session, name: str) -> None:
    session.execute(delete(WorkerRow).where(WorkerRow.name == name))
    session.commit()


def prune_workers(session: Session, settings: Settings) -> int:
    """Drop the rows of workers that died without unregistering (10× the stale limit ago)."""
    cutoff = utcnow() - timedelta(seconds=10 * settings.stale_after_seconds)
    removed = rowcount(session.execute(delete(WorkerRow).where(WorkerRow.heartbeat_at < cutoff)))
    session.commit()
    return removed


def live_workers(session: Session, settings: Settings) -> list[LiveWorker]:
    """Workers whose heartbeat is fresher than TAQ_STALE_AFTER_SECONDS, by class then name."""
    fresh = utcnow() - timedelta(seconds=settings.stale_after_seconds)
    rows = (
        session.execute(
            select(WorkerRow).where(WorkerRow.heartbeat_at >= fresh).order_by(WorkerRow.worker_class, WorkerRow.name)
        )
        .scalars()
        .all()
    )
    running = (
        dict(
            session.execute(
                select(Job.worker, Job.id).where(
                    Job.status == JobStatus.running, Job.worker.in_([r.name for r in rows])
                )
            ).all()
        )
        if rows
        else {}
    )
    return [
        LiveWorker(r.name, r.worker_class, r.device, r.memory_bytes, r.started_at, r.heartbeat_at, running.get(r.name))
        for r in rows
    ]


def queue_depth_by_class(session: Session, settings: Settings) -> dict[str, int]:
    """Queued jobs per worker class; every declared class is present (0 when empty). Jobs whose
    class is not declared count for the class their queue is (the largest)."""
    depth = {c.name: 0 for c in settings.fleet()}
    for name, n in session.execute(
        select(Job.worker_class, func.count()).where(Job.status == JobStatus.queued).group_by(Job.worker_class)
    ).all():
        target = settings.queue_class(name).name
        depth[target] += n
    return depth


def live_workers_by_class(
    session: Session, settings: Settings, workers: list[LiveWorker] | None = None
) -> dict[str, int]:
    """Live workers per class (every declared class present); `workers` when already listed."""
    counts = {c.name: 0 for c in settings.fleet()}
    for worker in live_workers(session, settings) if workers is None else workers:
        counts[worker.worker_class] = counts.get(worker.worker_class, 0) + 1
    return counts
