"""The Celery application factory and the enqueue call, shared by the API (sender) and the
worker (consumer). Importing this module does not import torch or the pipeline."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from common.settings import Settings
from common.worker_classes import QUEUE_PREFIX

log = logging.getLogger(__name__)

RUN_JOB_TASK = "taq.run_job"

_apps: dict[tuple[str, str, str], Celery] = {}
_lock = threading.Lock()


def class_queue(name: str) -> Queue:
    """The Celery queue of one worker class (``quantize.<class>``): a direct exchange of the same
    name, so a job published for a class reaches only that class's workers."""
    queue = f"{QUEUE_PREFIX}.{name}"
    return Queue(queue, Exchange(queue, type="direct"), routing_key=queue)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's configuration for this deployment, with one queue per worker class of the fleet
    (``taq worker --class NAME`` consumes only ``quantize.NAME``: Celery's own routing, no
    scheduler of ours)."""
    settings.ensure_dirs()
    queues = [class_queue(c.name) for c in settings.fleet()]
    # task events (received/started/succeeded/failed, and "sent" from the API) are what Flower
    # shows; like remote control, not on the embedded filesystem broker, where nothing reads them
    events = settings.broker_scheme != "filesystem"
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": settings.broker_transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        # a task sent without a class (none of ours) goes to the largest class
        "task_default_queue": queues[-1].name,
        "task_queues": queues,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": events,
        "task_send_sent_event": events,
        # the filesystem transport has no fan-out exchange for remote control
        "worker_enable_remote_control": settings.broker_scheme != "filesystem",
        "enable_utc": True,
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured now (the API's sender); the worker's app (worker/app.py) reads the
    same configuration lazily, when it starts."""
    app = Celery("taq", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def sender(settings: Settings) -> Celery:
    key = (settings.broker_url, str(settings.data_dir), settings.worker_classes)
    with _lock:
        app = _apps.get(key)
        if app is None:
            app = _apps[key] = make_celery(settings)
        return app


def enqueue_job(settings: Settings, job_id: str, worker_class: str | None) -> None:
    """Publish ``run_job(job_id)`` on the queue of the job's worker class (the largest class when
    that class is no longer declared). Raises on broker failure (the caller decides)."""
    queue = class_queue(settings.queue_class(worker_class).name)
    sender(settings).send_task(
        RUN_JOB_TASK,
        args=[job_id],
        queue=queue,
        routing_key=queue.routing_key,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
    )


def check_broker(settings: Settings) -> None:
    if settings.broker_scheme == "filesystem":
        settings.ensure_dirs()
    conn = sender(settings).connection_for_write()
    try:
        conn.ensure_connection(max_retries=1, timeout=3)
    finally:
        conn.release()
