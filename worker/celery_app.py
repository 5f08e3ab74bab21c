"""The Celery application of the worker (``celery -A worker.celery_app worker`` or ``taq worker``).

Settings come from the environment (``TAQ_``); the broker is ``TAQ_BROKER_URL`` (Redis in
production, kombu's filesystem transport under ``$TAQ_DATA_DIR/broker`` embedded). One job at a
time per process: concurrency 1, prefetch 1, late acks.
"""

from __future__ import annotations

import logging
import threading

from celery import signals

from common.broker import make_celery
from common.logging import configure_logging
from common.settings import get_settings

log = logging.getLogger("taq.worker")

settings = get_settings()
app = make_celery(settings)
app.conf.include = ["worker.tasks"]


@signals.setup_logging.connect
def _setup_logging(**_kwargs) -> None:
    configure_logging(settings.log_level, settings.log_json)


_reaper_started = threading.Event()
_presence: list = []


@signals.worker_shutting_down.connect
def _stopping(**_kwargs) -> None:
    from worker.errors import STOP_REQUESTED

    STOP_REQUESTED.set()


@signals.worker_ready.connect
def _start_reaper(**_kwargs) -> None:
    from worker.presence import Presence
    from worker.stages import pick_device
    from worker.tasks import start_reaper_thread

    if not _reaper_started.is_set():
        _reaper_started.set()
        start_reaper_thread(settings)
        presence = Presence(settings, pick_device(settings))
        presence.start()
        _presence.append(presence)


@signals.worker_shutdown.connect
def _unregister(**_kwargs) -> None:
    for presence in _presence:
        presence.stop()
