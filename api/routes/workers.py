"""/v1/workers: the operator's view of the fleet (classes, queue depth, live workers)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from api.deps import Operator, SessionDep, SettingsDep
from api.schemas import ERROR_RESPONSES, ErrorResponse, FleetOut, WorkerClassOut, WorkerOut
from common.fleet import live_workers, live_workers_by_class, queue_depth_by_class

router = APIRouter(prefix="/v1/workers", tags=["ops"], responses=ERROR_RESPONSES)


@router.get(
    "",
    operation_id="list_workers",
    response_model=FleetOut,
    responses={403: {"model": ErrorResponse, "description": "a tenant key, not the operator key"}},
)
def list_workers(session: SessionDep, settings: SettingsDep, _operator: Operator) -> FleetOut:
    """Worker classes with their queue depth and live workers (heartbeat fresher than
    TAQ_STALE_AFTER_SECONDS): class, device, memory, current job, last heartbeat. Needs the
    operator key (TAQ_ADMIN_KEY), or nothing in the keyless loopback mode."""
    workers = live_workers(session, settings)
    depth, alive = queue_depth_by_class(session, settings), live_workers_by_class(session, settings, workers)
    classes = [
        WorkerClassOut(
            name=c.name,
            device=c.device,
            memory_bytes=c.memory_bytes,
            queue=c.queue,
            queued_jobs=depth.get(c.name, 0),
            live_workers=alive.get(c.name, 0),
        )
        for c in settings.fleet()
    ]
    return FleetOut(classes=classes, workers=[WorkerOut(**asdict(w)) for w in workers])
