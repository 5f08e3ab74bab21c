"""``Idempotency-Key`` for the POST calls that create something (jobs, datasets).

One table, keys unique per tenant: the first answer is stored with a hash of the request; the
same key with the same request replays that answer, with another request (or on another call)
it is a 409 ``idempotency_conflict``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.errors import Conflict, InvalidRequest
from common.orm import IdempotencyKey
from core.canonical_json import json_sha256

MAX_IDEMPOTENCY_KEY = 255


@dataclass(frozen=True)
class StoredResponse:
    """A created resource's first answer (`replayed` when it came from the key table)."""

    resource_id: str
    status_code: int
    body: dict[str, Any]
    replayed: bool


def check_key(key: str) -> None:
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY} characters")


def request_digest(call: str, payload: dict[str, Any]) -> str:
    """sha256 of the call name and its canonical JSON payload."""
    return json_sha256({"call": call, **payload})


def find(session: Session, tenant: str, key: str, digest: str) -> IdempotencyKey | None:
    """The stored row for (tenant, key); a row stored for another request is a 409."""
    row = session.execute(
        select(IdempotencyKey).where(IdempotencyKey.tenant == tenant, IdempotencyKey.key == key)
    ).scalar_one_or_none()
    if row is None:
        return None
    if row.request_hash != digest:
        details = {
            name: value for name, value in (("job_id", row.job_id), ("dataset_id", row.dataset_id)) if value is not None
        }
        raise Conflict(
            "this Idempotency-Key was already used with a different request body",
            details=details,
            code="idempotency_conflict",
        )
    return row


def replay(session: Session, tenant: str, key: str, digest: str, resource: str) -> StoredResponse | None:
    """The stored first answer for (tenant, key) when it created a `resource` ("job_id" or
    "dataset_id"); None when the key is new (or stored for the other kind of resource)."""
    row = find(session, tenant, key, digest)
    if row is None:
        return None
    resource_id = getattr(row, resource)
    if resource_id is None:
        return None
    return StoredResponse(resource_id, row.status_code, row.response, replayed=True)
