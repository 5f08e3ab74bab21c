"""Server-sent events for a job: replay from ``after``, then follow until the job finishes.
Bounded by ``TAQ_SSE_MAX_SECONDS``; a comment line keeps proxies from closing an idle stream."""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

import anyio
from starlette.requests import Request

from api.schemas import EventOut
from common.db import session_scope
from common.jobs import events_since
from common.orm import JobStatus
from common.settings import Settings


def _fetch(settings: Settings, job_id: str, after: int):
    with session_scope(settings) as session:
        events, status = events_since(session, job_id, after)
        return [EventOut.of(e).model_dump(mode="json") for e in events], status


async def job_event_stream(request: Request, settings: Settings, job_id: str, after: int) -> AsyncIterator[str]:
    deadline = time.monotonic() + settings.sse_max_seconds
    last_keepalive = time.monotonic()
    yield "retry: 2000\n\n"
    while True:
        events, status = await anyio.to_thread.run_sync(_fetch, settings, job_id, after)
        for event in events:
            after = event["id"]
            yield f"id: {event['id']}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n"
        if not events and status in JobStatus.FINISHED:
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
