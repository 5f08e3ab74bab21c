"""The worker process's Celery signal handlers: logging, the stop flag the running job polls,
and the reaper and presence threads started once the worker is ready."""

from __future__ import annotations

import threading
from typing import Any

from celery import signals

from common.logging import configure_logging
from common.settings import get_settings

_threads_started = threading.Event()
_presence: list[Any] = []


@signals.setup_logging.connect
def _setup_logging(**_kwargs: Any) -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


@signals.worker_shutting_down.connect
def _stopping(**_kwargs: Any) -> None:
    from worker.errors import STOP_REQUESTED

    STOP_REQUESTED.set()


@signals.worker_ready.connect
def _start_threads(**_kwargs: Any) -> None:
    # heavy imports (the pipeline's device probe) only in a worker that is ready
    from worker.presence import Presence
    from worker.reaper import start_reaper_thread
    from worker.stages import pick_device

    if _threads_started.is_set():
        return
    _threads_started.set()
    settings = get_settings()
    start_reaper_thread(settings)
    presence = Presence(settings, pick_device(settings))
    presence.start()
    _presence.append(presence)


@signals.worker_shutdown.connect
def _unregister(**_kwargs: Any) -> None:
    for presence in _presence:
        presence.stop()
