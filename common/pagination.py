"""Keyset pagination shared by the job and dataset listings: newest first on (created_at, id),
with an opaque cursor a client passes back for the next page."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from common.errors import InvalidParameter, InvalidRequest
from common.orm import Dataset, Job
from common.settings import Settings

#: what a listing pages through
_Listed = TypeVar("_Listed", Job, Dataset)


def encode_cursor(job: Job | Dataset) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


#: our cursors are ~90 characters; anything much longer is not one of ours
MAX_CURSOR_LENGTH = 256


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    invalid = InvalidRequest("invalid cursor; pass back the 'next_cursor' of the previous page")
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(str(created)), str(job_id)
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise invalid from None


def page_size(settings: Settings, limit: int | None) -> int:
    """The rows of one page: `limit`, or the default page size; InvalidParameter beyond the maximum."""
    limit = limit or settings.default_page_size
    if not 1 <= limit <= settings.max_page_size:
        raise InvalidParameter(f"limit must be between 1 and {settings.max_page_size}")
    return limit


def keyset_page(
    session: Session, query: Select[_Listed], entity: type[_Listed], limit: int, cursor: str | None
) -> tuple[list[_Listed], str | None]:
    """One page of `query`'s rows of `entity` (jobs or datasets), newest first: the `limit` rows
    after `cursor` in (created_at, id) order, and the cursor of the next page (None on the last)."""
    if cursor:
        created, last_id = decode_cursor(cursor)
        query = query.where(or_(entity.created_at < created, and_(entity.created_at == created, entity.id < last_id)))
    rows = list(session.execute(query.order_by(entity.created_at.desc(), entity.id.desc()).limit(limit + 1)).scalars())
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor
