"""This worker's row in the `workers` table (common.fleet): registered when Celery is ready,
refreshed every TAQ_HEARTBEAT_SECONDS by a daemon thread, removed on a clean shutdown. A
SIGKILLed worker's row goes stale and drops out of GET /v1/workers."""

from __future__ import annotations

import logging
import threading

from common.db import session_scope
from common.fleet import beat_worker, register_worker, unregister_worker
from common.lifecycle import worker_name
from common.settings import Settings

log = logging.getLogger("taq.worker")


class Presence:
    def __init__(self, settings: Settings, device: str) -> None:
        self.settings, self.device = settings, device
        self.worker_class = settings.own_worker_class()
        self.name = worker_name()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="taq-presence", daemon=True)

    def _register(self) -> None:
        with session_scope(self.settings) as session:
            register_worker(session, self.name, self.worker_class, self.device)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        registered = False
        while not self._stop.is_set():
            try:
                if not registered:
                    self._register()
                    registered = True
                    log.info("worker registered", extra={"worker_class": self.worker_class.name, "device": self.device})
                else:
                    with session_scope(self.settings) as session:
                        registered = beat_worker(session, self.name)
            except Exception as exc:  # the database may be down for a while; never kill the worker
                log.warning("worker heartbeat failed", extra={"error": repr(exc)})
            self._stop.wait(self.settings.heartbeat_seconds)

    def stop(self) -> None:
        self._stop.set()
        try:
            with session_scope(self.settings) as session:
                unregister_worker(session, self.name)
        except Exception as exc:
            log.warning("could not unregister the worker", extra={"error": repr(exc)})
