"""Liveness, readiness (DB, broker, storage) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.deps import SettingsDep, StorageDep
from api.errors import envelope
from api.schemas import ErrorResponse, HealthOut, ReadyOut
from common.auth import bearer_matches
from common.errors import Unauthorized
from common.health import readiness
from common.metrics import render_metrics

router = APIRouter(tags=["ops"])


@router.get("/healthz", operation_id="healthz", response_model=HealthOut)
def healthz() -> HealthOut:
    return HealthOut()


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=ReadyOut,
    responses={503: {"model": ErrorResponse, "description": "a dependency is unreachable"}},
)
def readyz(settings: SettingsDep, storage: StorageDep):
    checks = readiness(settings, storage)
    if all(v == "ok" for v in checks.values()):
        return ReadyOut(status="ok", checks=checks)
    failing = sorted(k for k, v in checks.items() if v != "ok")
    return envelope(503, "not_ready", f"unavailable: {', '.join(failing)}", {"checks": checks})


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}},
        401: {"model": ErrorResponse, "description": "TAQ_METRICS_KEY is set and was not sent"},
    },
)
def metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus metrics; with TAQ_METRICS_KEY set, only for `Authorization: Bearer <it>`."""
    if settings.metrics_key and not bearer_matches(request.headers.get("authorization"), settings.metrics_key):
        raise Unauthorized("/metrics needs the metrics key: send 'Authorization: Bearer <TAQ_METRICS_KEY>'")
    return Response(render_metrics(settings), media_type="text/plain; version=0.0.4; charset=utf-8")
