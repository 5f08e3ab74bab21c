"""Which exceptions are transient (retry the task) rather than a failed job."""

from __future__ import annotations

import sqlalchemy.exc
from kombu.exceptions import OperationalError as KombuOperationalError


class LostOwnership(Exception):
    """Another worker owns the job now (ours was presumed dead): stop without writing."""


def _botocore_transient() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
    except ImportError:  # pragma: no cover
        return ()
    return (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError)


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    KombuOperationalError,
    ConnectionError,
    TimeoutError,
    *_botocore_transient(),
)


class WorkerStopping(Exception):
    """The worker is shutting down (SIGTERM): hand the job back to the queue."""


#: set by the worker_shutting_down signal; polled by the running job's should_cancel
STOP_REQUESTED = __import__("threading").Event()
