"""What the calls that create something (POST /v1/jobs, POST /v1/datasets) share for
``Idempotency-Key`` (``common.idempotency`` stores and replays the answers): the header, its 409
in the schema, and the answer, marked ``Idempotent-Replayed`` when it is a stored one."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header
from fastapi.responses import JSONResponse

from api.schemas import ErrorResponse
from common.idempotency import StoredResponse

IdempotencyKeyHeader = Annotated[str | None, Header(alias="Idempotency-Key")]

#: the 409 a create call documents: the key was used before with another request body
KEY_REUSED: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "Idempotency-Key reused with another body"}
}


def created_response(stored: StoredResponse, headers: dict[str, str] | None = None) -> JSONResponse:
    """The create call's answer (the first one, or the stored one replayed) with `headers`."""
    headers = dict(headers or {})
    if stored.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(stored.body, status_code=stored.status_code, headers=headers)
