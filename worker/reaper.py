"""The reaper: requeue jobs of dead workers (or fail them after ``max_attempts``), finish cancelled
ones, re-send queued jobs the broker may have lost, prune dead workers and apply retention. Every
worker runs it on a thread; ``taq admin reap`` runs one pass."""

from __future__ import annotations

import logging
import threading

from common.broker import enqueue_job
from common.db import session_scope
from common.fleet import prune_workers
from common.lifecycle import reap
from common.retention import retention_pass
from common.settings import Settings
from common.storage import storage_from_settings

log = logging.getLogger("taq.worker")


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
