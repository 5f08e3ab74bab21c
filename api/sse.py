"""Server-sent events for a job: replay from ``after``, then follow until the job finishes.
Bounded by ``TAQ_SSE_MAX_SECONDS``; a comment line keeps proxies from closing an idle stream.
Each poll uses its own short session (a stream never holds a pooled connection between polls),
and ``StreamSlots`` caps the streams open per tenant and in all (shared by the API replicas
through Redis when there is one: api/shared_limits.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Protocol

import anyio
from starlette.requests import Request

from api.schemas import EventOut
from common.db import session_scope
from common.errors import TooManyRequests
from common.job_status import FINISHED_STATUSES
from common.jobs import events_since
from common.settings import Settings

#: event ids are BIGINT; a larger `after` / `Last-Event-ID` is a 422, not an overflow in the driver
MAX_EVENT_ID = 2**63 - 1
#: what a refused stream is told to wait before trying again
RETRY_AFTER_SECONDS = 5


def too_many_streams(over_tenant: bool, per_tenant: int, total: int) -> TooManyRequests:
    limit = per_tenant if over_tenant else total
    setting = "TAQ_MAX_STREAMS_PER_TENANT" if over_tenant else "TAQ_MAX_STREAMS"
    return TooManyRequests(
        f"{'this tenant has' if over_tenant else 'the service has'} {limit} event streams open "
        f"({setting}={limit}); close one, poll GET /v1/jobs/{{id}}/events?after=N instead, or retry "
        f"in {RETRY_AFTER_SECONDS} s",
        details={"limit": limit, "setting": setting, "retry_after": RETRY_AFTER_SECONDS},
        code="too_many_streams",
    )


class Slot(Protocol):
    """One open stream's place. `refresh` (every `refresh_seconds` while the stream is open; None:
    never) and `release` may do I/O: the stream calls them on a worker thread."""

    refresh_seconds: float | None

    def refresh(self) -> None: ...

    def release(self) -> None: ...


class StreamSlots:
    """Open event streams per tenant and in all, counted in this API process. With Redis
    (``Settings.limits_redis``) `api.shared_limits.SharedStreamSlots` counts them across the
    replicas and falls back to this one while Redis is unreachable."""

    def __init__(self, settings: Settings) -> None:
        self.per_tenant, self.total = settings.max_streams_per_tenant, settings.max_streams
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> StreamSlot:
        with self._lock:
            mine, everyone = self._open.get(tenant, 0), sum(self._open.values())
            if mine >= self.per_tenant or everyone >= self.total:
                raise too_many_streams(mine >= self.per_tenant, self.per_tenant, self.total)
            self._open[tenant] = mine + 1
        return StreamSlot(self, tenant)

    def release(self, tenant: str) -> None:
        with self._lock:
            left = self._open.get(tenant, 0) - 1
            if left > 0:
                self._open[tenant] = left
            else:
                self._open.pop(tenant, None)

    def close(self) -> None:
        """Nothing to close (the shared slots close their Redis connections)."""


class StreamSlot:
    """A `Slot` counted in this process."""

    def __init__(self, slots: StreamSlots, tenant: str) -> None:
        self._slots, self._tenant, self._held = slots, tenant, True
        self.refresh_seconds: float | None = None

    def refresh(self) -> None:
        """Nothing to renew in this process."""

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release(self._tenant)


def _fetch(settings: Settings, job_id: str, after: int):
    with session_scope(settings) as session:
        events, status = events_since(session, job_id, after)
        return [EventOut.of(e).model_dump(mode="json") for e in events], status


async def job_event_stream(
    request: Request, settings: Settings, job_id: str, after: int, slot: Slot
) -> AsyncIterator[str]:
    try:
        async for chunk in _follow(request, settings, job_id, after, slot):
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):  # a disconnect cancels the stream; the slot is still freed
            await anyio.to_thread.run_sync(slot.release)


async def _follow(request: Request, settings: Settings, job_id: str, after: int, slot: Slot) -> AsyncIterator[str]:
    deadline = time.monotonic() + settings.sse_max_seconds
    last_keepalive = renewed = time.monotonic()
    yield "retry: 2000\n\n"
    while True:
        if slot.refresh_seconds is not None and time.monotonic() - renewed >= slot.refresh_seconds:
            renewed = time.monotonic()
            await anyio.to_thread.run_sync(slot.refresh)  # the lease of a shared slot
        events, status = await anyio.to_thread.run_sync(_fetch, settings, job_id, after)
        for event in events:
            after = event["id"]
            yield f"id: {event['id']}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n"
        if not events and status in FINISHED_STATUSES:
            yield f"event: end\ndata: {json.dumps({'job_id': job_id, 'status': status})}\n\n"
            return
        if time.monotonic() > deadline:
            yield f"event: timeout\ndata: {json.dumps({'job_id': job_id, 'status': status})}\n\n"
            return
        if await request.is_disconnected():
            return
        if not events and time.monotonic() - last_keepalive > 15:
            last_keepalive = time.monotonic()
            yield ": keep-alive\n\n"
        if not events:
            await asyncio.sleep(settings.sse_poll_seconds)
