"""Datasets: uploaded JSONL, validated whole, stored content-addressed (``datasets/{sha256}.jsonl``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common import idempotency
from common.errors import NotFound, PayloadTooLarge
from common.idempotency import StoredResponse
from common.ids import new_id
from common.limits import (
    check_dataset_quota,
    check_dataset_rows,
    check_prompt_sizes,
    check_storage_quota,
    nonblank_line_numbers,
)
from common.orm import Dataset, IdempotencyKey
from common.settings import Settings
from common.storage import Storage, dataset_key


def upload_dataset(
    session: Session, storage: Storage, settings: Settings, tenant: str, data: bytes, filename: str | None = None
) -> Dataset:
    """Validate every line (core.data.parse_jsonl raises DataError with line numbers), store the
    bytes once per content, and record the dataset for the tenant (same bytes → same dataset)."""
    from core.data import parse_jsonl

    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"dataset is {len(data)} bytes; the limit is {settings.max_upload_bytes} (TAQ_MAX_UPLOAD_BYTES)"
        )
    lines = nonblank_line_numbers(data)
    check_dataset_rows(settings, len(lines))  # before parsing: a row costs far more parsed than raw
    rows = parse_jsonl(data)
    check_prompt_sizes(settings, rows, lines)
    digest = hashlib.sha256(data).hexdigest()
    existing = session.execute(
        select(Dataset).where(Dataset.tenant == tenant, Dataset.sha256 == digest)
    ).scalar_one_or_none()
    if existing is not None:
        return existing
    check_dataset_quota(session, settings, tenant)  # 429 dataset_limit
    check_storage_quota(session, settings, tenant, adding=len(data))  # 413 storage_quota
    key = dataset_key(digest)
    if not storage.exists(key):
        storage.put_bytes(key, data)
    row = Dataset(
        id=new_id("ds"),
        tenant=tenant,
        sha256=digest,
        rows=len(rows),
        has_answers=any(r.answers for r in rows),
        size=len(data),
        filename=(filename or "")[:255] or None,
        storage_key=key,
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # the same upload raced us
        session.rollback()
        return session.execute(select(Dataset).where(Dataset.tenant == tenant, Dataset.sha256 == digest)).scalar_one()
    return row


def create_dataset(
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: str,
    data: bytes,
    filename: str | None,
    render: Callable[[Dataset], dict[str, Any]],
    idempotency_key: str | None = None,
) -> StoredResponse:
    """upload_dataset behind an optional ``Idempotency-Key``: the same key with the same file bytes
    and filename replays the first answer (201); with another body it is a 409."""
    digest = None
    if idempotency_key is not None:
        idempotency.check_key(idempotency_key)
        digest = idempotency.request_digest(
            "upload_dataset", {"sha256": hashlib.sha256(data).hexdigest(), "filename": filename or ""}
        )
        stored = idempotency.replay(session, tenant, idempotency_key, digest, "dataset_id")
        if stored is not None:
            return stored
    row = upload_dataset(session, storage, settings, tenant, data, filename)
    body = render(row)
    if idempotency_key is None or digest is None:  # digest is None exactly when there is no key
        return StoredResponse(row.id, 201, body, replayed=False)
    session.add(
        IdempotencyKey(
            tenant=tenant, key=idempotency_key, request_hash=digest, dataset_id=row.id, status_code=201, response=body
        )
    )
    try:
        session.commit()
    except IntegrityError:  # the same key raced us: replay its answer (or 409 for another body)
        session.rollback()
        stored = idempotency.replay(session, tenant, idempotency_key, digest, "dataset_id")
        if stored is None:
            raise
        return stored
    return StoredResponse(row.id, 201, body, replayed=False)


def get_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None or row.tenant != tenant:
        raise NotFound(f"dataset '{dataset_id}' not found", code="dataset_not_found")
    return row
