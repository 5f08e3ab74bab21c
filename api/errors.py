"""The error envelope ``{"error": {"code", "message", "details"}}`` for every failure, including
validation errors (422), unknown routes (404) and unexpected exceptions (500, no stack trace)."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import errors as svc
from common.logging import request_id_var
from common.redact import redact_paths, redact_text
from core import errors as core_errors

log = logging.getLogger(__name__)

STATUS_BY_TYPE: list[tuple[type, int]] = [
    (svc.NotFound, 404),
    (svc.Conflict, 409),
    (svc.Unauthorized, 401),
    (svc.Forbidden, 403),
    (svc.PayloadTooLarge, 413),
    (svc.TooManyRequests, 429),
    (svc.InvalidParameter, 422),
    (svc.InvalidRequest, 400),
    (svc.RangeNotSatisfiable, 416),
    (svc.NotReady, 503),
    (svc.TransientError, 503),
    (svc.InvalidKey, 400),
    (core_errors.ModelNotFound, 404),
    (core_errors.UnsafeModel, 422),
    (core_errors.UnsupportedModel, 422),
    (core_errors.ModelInvalid, 422),
    (core_errors.DataError, 422),
    (core_errors.BudgetInfeasible, 422),
    (core_errors.InvalidSpec, 422),
]

CODE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


def envelope(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    # the request id ties what the client saw to the server's log lines (which hold the details
    # a client must not see: paths, exception text)
    return JSONResponse(
        status_code=status,
        headers=headers,
        content={
            "error": {
                "code": code,
                "message": message,
                "details": jsonable_encoder(details),
                "request_id": request_id_var.get() or None,
            }
        },
    )


def status_for(exc: core_errors.TaqError) -> int:
    for cls, status in STATUS_BY_TYPE:
        if isinstance(exc, cls):
            return status
    return 400


def _clean_validation(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cleaned = []
    for err in errors:
        loc = list(err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        cleaned.append({"loc": loc, "msg": msg, "type": err.get("type")})
    return cleaned


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(core_errors.TaqError)
    async def _taq(request: Request, exc: core_errors.TaqError):
        status = status_for(exc)
        headers = None
        if status == 401:
            headers = {"WWW-Authenticate": 'Bearer realm="taq"'}
        elif status == 416 and isinstance(exc.details, dict) and "size" in exc.details:
            headers = {"Content-Range": f"bytes */{exc.details['size']}"}
        elif status == 429 and isinstance(exc.details, dict) and "retry_after" in exc.details:
            headers = {"Retry-After": str(exc.details["retry_after"])}
        return envelope(status, exc.code, redact_text(exc.message), redact_paths(exc.details), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        details = _clean_validation(list(exc.errors()))
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "header", "path"))
        prefix = f"{where}: " if where else ""
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        return envelope(422, "validation_error", f"invalid request: {prefix}{first['msg']}{more}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = CODE_BY_STATUS.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route for {request.method} {request.url.path}"
        return envelope(exc.status_code, code, message, None, getattr(exc, "headers", None))

    @app.exception_handler(sqlalchemy.exc.OperationalError)
    @app.exception_handler(sqlalchemy.exc.InterfaceError)
    @app.exception_handler(sqlalchemy.exc.TimeoutError)
    async def _database_down(request: Request, exc: Exception):
        return database_unavailable(request.url.path, exc)

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError):
        # a request body (or value in it) nested deeper than the JSON parser can follow
        return envelope(422, "validation_error", "invalid request: JSON nested too deeply")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return unexpected_error(request.url.path, exc)


def unexpected_error(path: str, exc: BaseException) -> JSONResponse:
    """The answer to an exception no handler knew: 503 for a lost database connection, else a
    500 whose message names nothing internal (the log has the traceback and the request id)."""
    if is_disconnect(exc):
        return database_unavailable(path, exc)
    log.error("unhandled error", extra={"path": path}, exc_info=exc)
    return envelope(500, "internal_error", "internal server error; the incident was logged with the request id")


def is_disconnect(exc: BaseException) -> bool:
    """A DB-API error that SQLAlchemy recognised as a lost connection (whatever its class)."""
    return isinstance(exc, sqlalchemy.exc.DBAPIError) and bool(exc.connection_invalidated)


def database_unavailable(path: str, exc: BaseException) -> JSONResponse:
    """503 ``database_unavailable`` for a database that cannot be reached (outage, restart, lost
    connection, exhausted pool). The engine pings pooled connections before use, so the next
    request after the database is back gets a fresh connection: no restart needed."""
    log.error("database unavailable", extra={"path": path, "error": type(exc).__name__})
    return envelope(
        503, "database_unavailable", "the database is unavailable; retry shortly", headers={"Retry-After": "5"}
    )
