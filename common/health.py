"""Readiness checks of the three dependencies, each bounded in time."""

from __future__ import annotations

import concurrent.futures
import logging

from common.broker import check_broker
from common.db import check_database
from common.settings import Settings
from common.storage import Storage

log = logging.getLogger(__name__)
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=3, thread_name_prefix="readyz")


def readiness(settings: Settings, storage: Storage, timeout: float = 5.0) -> dict[str, str]:
    probes = {
        "database": lambda: check_database(settings),
        "broker": lambda: check_broker(settings),
        "storage": storage.check,
    }
    futures = {name: _pool.submit(fn) for name, fn in probes.items()}
    checks = {}
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            checks[name] = "ok"
        except concurrent.futures.TimeoutError:
            checks[name] = "timeout"
        except Exception as exc:  # report the class, not secrets from URLs
            log.warning("readiness probe failed", extra={"probe": name, "error": type(exc).__name__})
            checks[name] = f"error: {type(exc).__name__}"
    return checks
