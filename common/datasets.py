"""Datasets: uploaded JSONL, validated whole, stored content-addressed (``datasets/{sha256}.jsonl``)."""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.errors import NotFound, PayloadTooLarge
from common.ids import new_id
from common.orm import Dataset
from common.settings import Settings
from common.storage import Storage, dataset_key


def upload_dataset(session: Session, storage: Storage, settings: Settings, tenant: str,
                   data: bytes, filename: str | None = None) -> Dataset:
    """Validate every line (core.data.parse_jsonl raises DataError with line numbers), store the
    bytes once per content, and record the dataset for the tenant (same bytes → same dataset)."""
    from core.data import parse_jsonl

    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"dataset is {len(data)} bytes; the limit is {settings.max_upload_bytes}")
    rows = parse_jsonl(data)
    digest = hashlib.sha256(data).hexdigest()
    existing = session.execute(select(Dataset).where(Dataset.tenant == tenant, Dataset.sha256 == digest)
                               ).scalar_one_or_none()
    if existing is not None:
        return existing
    key = dataset_key(digest)
    if not storage.exists(key):
        storage.put_bytes(key, data)
    row = Dataset(id=new_id("ds"), tenant=tenant, sha256=digest, rows=len(rows),
                  has_answers=any(r.answers for r in rows), size=len(data),
                  filename=(filename or "")[:255] or None, storage_key=key)
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # the same upload raced us
        session.rollback()
        return session.execute(select(Dataset).where(Dataset.tenant == tenant, Dataset.sha256 == digest)
                               ).scalar_one()
    return row


def get_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None or row.tenant != tenant:
        raise NotFound(f"dataset '{dataset_id}' not found", code="dataset_not_found")
    return row


def load_rows(storage: Storage, dataset: Dataset):
    from core.data import parse_jsonl

    return parse_jsonl(storage.get_bytes(dataset.storage_key))
