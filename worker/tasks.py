"""The one Celery task: ``run_job(job_id)``. Thin: claim the row atomically, run the stages,
retry only transient infrastructure errors."""

from __future__ import annotations

import logging

from common.broker import RUN_JOB_TASK
from common.db import session_scope
from common.lifecycle import claim_job
from common.logging import job_context
from common.settings import get_settings
from common.storage import storage_from_settings
from worker.app import app
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
