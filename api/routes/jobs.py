"""/v1/jobs: submit, list, get, cancel, events, profile, artifacts."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from api.deps import CurrentTenant, SessionDep, SettingsDep, StorageDep
from api.idempotency import KEY_REUSED, IdempotencyKeyHeader, created_response
from api.schemas import (
    ERROR_RESPONSES,
    ArtifactOut,
    ErrorResponse,
    EventOut,
    JobOut,
    JobPage,
    LayerOut,
    ProfileOut,
)
from api.sse import MAX_EVENT_ID, job_event_stream
from common import jobs as service
from common import retention
from common.artifacts import open_download
from common.db import session_scope
from common.errors import NotFound
from common.job_status import JobStatus
from common.storage import job_key
from core.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)


@router.post(
    "",
    operation_id="create_job",
    status_code=202,
    response_model=JobOut,
    responses={
        **KEY_REUSED,
        413: {"model": ErrorResponse, "description": "request body too large"},
        429: {"model": ErrorResponse, "description": "the tenant's queued-job limit is reached (`queued_job_limit`)"},
    },
)
def create_job(
    spec: JobSpec,
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    """Submit a quantization job; it is queued and runs on a worker."""
    submitted = service.submit_job(session, settings, tenant, spec, JobOut.render, idempotency_key)
    return created_response(submitted, {"Location": f"/v1/jobs/{submitted.resource_id}"})


@router.get("", operation_id="list_jobs", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    status: Annotated[list[JobStatus] | None, Query()] = None,
    limit: Annotated[int | None, Query(ge=1)] = None,
    cursor: str | None = None,
) -> JobPage:
    """Jobs of the caller, newest first; follow `next_cursor` for more."""
    rows, next_cursor = service.list_jobs(session, settings, tenant, status=status, limit=limit, cursor=cursor)
    return JobPage(items=[JobOut.of(j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", operation_id="get_job", response_model=JobOut)
def get_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobOut:
    return JobOut.of(service.get_job(session, tenant, job_id))


@router.delete(
    "/{job_id}",
    operation_id="delete_job",
    status_code=204,
    response_class=Response,
    responses={409: {"model": ErrorResponse, "description": "the job is queued or running"}},
)
def delete_job(job_id: str, session: SessionDep, storage: StorageDep, tenant: CurrentTenant) -> Response:
    """Delete a finished job and its artifacts (409 `job_not_finished` while queued or running)."""
    retention.delete_job(session, storage, tenant, job_id)
    return Response(status_code=204)


@router.post(
    "/{job_id}/cancel",
    operation_id="cancel_job",
    status_code=202,
    response_model=JobOut,
    responses={409: {"description": "the job already finished"}},
)
def cancel_job(job_id: str, session: SessionDep, storage: StorageDep, tenant: CurrentTenant) -> JobOut:
    """Cooperative cancel: a queued job stops at once, a running one between layers."""
    return JobOut.of(service.cancel_job(session, storage, tenant, job_id))


@router.get(
    "/{job_id}/events",
    operation_id="list_job_events",
    response_model=list[EventOut],
    responses={200: {"content": {"text/event-stream": {}}}},
)
def list_job_events(
    job_id: str,
    request: Request,
    settings: SettingsDep,
    tenant: CurrentTenant,
    after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID)] = 0,
    last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0, le=MAX_EVENT_ID)] = None,
):
    """Progress events; `Accept: text/event-stream` streams them until the job finishes (at most
    TAQ_MAX_STREAMS_PER_TENANT open per tenant: 429 with Retry-After over it)."""
    # short sessions only: a stream lives for minutes and must not hold a pooled connection
    with session_scope(settings) as session:
        if "text/event-stream" not in request.headers.get("accept", ""):
            return [EventOut.of(e) for e in service.list_events(session, tenant, job_id, after=after)]
        service.get_job(session, tenant, job_id)
    slot = request.app.state.streams.acquire(tenant)  # 429 too_many_streams
    stream = job_event_stream(request, settings, job_id, max(after, last_event_id or 0), slot)
    return StreamingResponse(
        stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.get(
    "/{job_id}/profile",
    operation_id="get_job_profile",
    response_model=ProfileOut,
    responses={200: {"content": {"image/png": {}}}},
)
def get_job_profile(
    job_id: str,
    session: SessionDep,
    storage: StorageDep,
    tenant: CurrentTenant,
    format: Literal["json", "png"] = "json",
):
    """The per-layer sensitivity profile; `?format=png` for the plot."""
    job, layers = service.get_profile(session, tenant, job_id)
    if format == "png":
        key = job_key(job_id, "artifacts", "profile.png")
        if not storage.exists(key):
            raise NotFound(f"job '{job_id}' has no profile plot yet", code="profile_not_ready")
        return Response(storage.get_bytes(key), media_type="image/png")
    return ProfileOut(
        job_id=job.id, model=job.spec["model"], method=job.spec["method"], layers=[LayerOut.of(l) for l in layers]
    )


@router.get("/{job_id}/artifacts", operation_id="list_job_artifacts", response_model=list[ArtifactOut])
def list_job_artifacts(job_id: str, session: SessionDep, tenant: CurrentTenant) -> list[ArtifactOut]:
    return [ArtifactOut.of(a) for a in service.list_artifacts(session, tenant, job_id)]


_DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}},
    206: {"description": "partial"},
    304: {"description": "not modified"},
    307: {"description": "presigned URL"},
    416: {"description": "range not satisfiable"},
}


@router.get(
    "/{job_id}/artifacts/{name:path}",
    operation_id="download_job_artifact",
    summary="Download Job Artifact",
    description="Download one artifact (`Range`, `ETag`); a directory (`hf`) comes as a streamed .tar.",
    responses=_DOWNLOAD_RESPONSES,
)
@router.head(
    "/{job_id}/artifacts/{name:path}",
    operation_id="head_job_artifact",
    summary="Head Job Artifact",
    description="The headers a download would get (size, `ETag`, `X-Checksum-Sha256`), no body.",
    responses=_DOWNLOAD_RESPONSES,
)
def download_job_artifact(
    request: Request,
    job_id: str,
    name: str,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    range: Annotated[str | None, Header()] = None,
    if_none_match: Annotated[str | None, Header()] = None,
    if_range: Annotated[str | None, Header()] = None,
):
    # one handler for GET and HEAD: the same checks and headers, HEAD without the body
    head = request.method == "HEAD"
    dl = open_download(
        session,
        storage,
        settings,
        tenant,
        job_id,
        name,
        range_header=range,
        if_none_match=if_none_match,
        if_range=if_range,
        head=head,
    )
    if dl.redirect:
        return RedirectResponse(dl.redirect, status_code=dl.status, headers=dl.headers)
    if dl.body is None or head:
        return Response(status_code=dl.status, headers=dl.headers)
    return StreamingResponse(dl.body, status_code=dl.status, headers=dl.headers)
