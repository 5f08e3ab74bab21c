"""Errors raised by the service layer (``common``). HTTP-agnostic: ``api/errors.py`` maps each
``code`` to a status. Core's own ``TaqError`` subclasses pass through unchanged."""

from __future__ import annotations

from typing import Any

from core.errors import TaqError


class ServiceError(TaqError):
    """`code` may be narrowed per raise (e.g. `job_not_found` for a NotFound) so clients can branch."""

    code = "service_error"

    def __init__(self, message: str, details: Any = None, code: str | None = None) -> None:
        super().__init__(message, details)
        if code:
            self.code = code


class NotFound(ServiceError):
    code = "not_found"


class Conflict(ServiceError):
    code = "conflict"


class Unauthorized(ServiceError):
    code = "unauthorized"


class Forbidden(ServiceError):
    """Authenticated, but this key may not do that (403)."""

    code = "forbidden"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class InvalidRequest(ServiceError):
    code = "invalid_request"


class InvalidParameter(InvalidRequest):
    """A well-formed parameter with an unacceptable value (422)."""

    code = "invalid_parameter"


class TooManyRequests(ServiceError):
    """A per-tenant quota is exhausted (429); the message names the limit."""

    code = "too_many_requests"


class RangeNotSatisfiable(ServiceError):
    code = "range_not_satisfiable"


class NotReady(ServiceError):
    code = "not_ready"


class InvalidKey(ServiceError):
    """A storage key that is not one the service builds itself."""

    code = "invalid_storage_key"


class TransientError(ServiceError):
    """Infrastructure hiccup (DB/broker/storage unreachable): the worker retries these."""

    code = "transient"
