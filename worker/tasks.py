"""The one Celery task: ``run_job(job_id)``. Thin: claim the row atomically, run the stages,
retry only transient infrastructure errors."""

from __future__ import annotations

import logging
import threading

from common.broker import RUN_JOB_TASK, enqueue_job
from common.db import session_scope
from common.fleet import prune_workers
from common.lifecycle import claim_job, reap
from common.logging import job_context
from common.retention import retention_pass
from common.settings import Settings, get_settings
from common.storage import storage_from_settings
from worker.celery_app import app
from worker.errors import TRANSIENT_ERRORS

log = logging.getLogger("taq.worker")


@app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True, max_retries=5)
def run_job(self, job_id: str) -> str:
    settings = get_settings()
    with job_context(job_id):
        try:
            with session_scope(settings) as session:
                claim = claim_job(session, settings, job_id)
        except TRANSIENT_ERRORS as exc:
            log.warning("claim failed, retrying", extra={"error": repr(exc)})
            raise self.retry(exc=exc, countdown=min(60, 2**self.request.retries)) from exc
        if claim is None:
            log.info("job not claimable (finished, cancelled, or owned by a live worker)")
            return "skipped"
        from worker.stages import run_claimed  # heavy imports (torch) only in the worker

        outcome = run_claimed(settings, storage_from_settings(settings), claim)
        if outcome == "retry":
            raise self.retry(countdown=min(60, 2 ** (self.request.retries + 1)))
        return outcome


def reap_once(settings: Settings) -> None:
    storage = storage_from_settings(settings)
    with session_scope(settings) as session:
        reap(session, settings, storage, lambda job_id, worker_class: enqueue_job(settings, job_id, worker_class))
        prune_workers(session, settings)
        retention_pass(session, settings, storage)


def start_reaper_thread(settings: Settings) -> threading.Thread:
    """Run the reaper every ``TAQ_REAPER_INTERVAL_SECONDS`` (first pass at start: it picks up jobs
    left over by a crash)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                reap_once(settings)
            except Exception as exc:  # never let the reaper kill the worker
                log.warning("reaper pass failed", extra={"error": repr(exc)})
            stop.wait(settings.reaper_interval_seconds)

    thread = threading.Thread(target=loop, name="taq-reaper", daemon=True)
    thread.stop = stop  # type: ignore[attr-defined]
    thread.start()
    return thread
