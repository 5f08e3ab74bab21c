"""Request/response models of the v1 API (the job spec itself is ``core.spec.JobSpec``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from common.job_status import JobStatus
from common.orm import Artifact, Job, JobEvent, ProfileLayer
from core.spec import JobSpec

#: the `next_cursor` of every page of a listing
NextCursor = Annotated[str | None, Field(description="pass as `cursor` for the next page; null on the last page")]


class ErrorInfo(BaseModel):
    code: str = Field(examples=["job_not_found"])
    message: str
    details: Any = None
    request_id: str | None = Field(
        default=None,
        description="the X-Request-ID of the call; quote it when "
        "reporting a problem (the server's logs carry the details)",
    )


class ErrorResponse(BaseModel):
    error: ErrorInfo


class JobOut(BaseModel):
    id: str
    status: JobStatus
    stage: str | None
    progress: float = Field(ge=0.0, le=1.0)
    error: ErrorInfo | None
    spec: JobSpec
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime | None = None
    heartbeat_at: datetime | None = None
    attempts: int = 0
    cancel_requested: bool = False
    worker_class: str | None = Field(
        default=None,
        description="the worker class (TAQ_WORKER_CLASSES) the job "
        "was routed to: the smallest whose memory holds it, or the pinned one",
    )

    @classmethod
    def of(cls, job: Job) -> JobOut:
        error = None
        if job.error_code:
            error = ErrorInfo(
                code=job.error_code, message=job.error_message or job.error_code, details=job.error_details
            )
        return cls(
            id=job.id,
            status=JobStatus(job.status),  # the ORM column is a plain string
            stage=job.stage,
            progress=job.progress or 0.0,
            error=error,
            spec=JobSpec.model_validate(job.spec),
            result=job.result,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
            heartbeat_at=job.heartbeat_at,
            attempts=job.attempts or 0,
            cancel_requested=bool(job.cancel_requested),
            worker_class=job.worker_class,
        )

    @classmethod
    def render(cls, job: Job) -> dict[str, Any]:
        return cls.of(job).model_dump(mode="json")


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: NextCursor


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # every field is the JobEvent column of its name

    id: int
    job_id: str
    created_at: datetime
    kind: str = Field(description="status | stage | progress | info")
    status: str | None
    stage: str | None
    progress: float | None
    message: str | None
    data: dict[str, Any] | None

    @classmethod
    def of(cls, e: JobEvent) -> EventOut:
        return cls.model_validate(e)


class LinearOut(BaseModel):
    """One linear of a layer: its relative output error per width and, under per-linear
    allocation, its bits."""

    name: str
    params: int
    quant_error: dict[str, float]
    bits: int | None = None


class LayerOut(BaseModel):
    index: int
    name: str
    params: int
    importance: float
    sensitivity: float
    bits: int | None = Field(
        description="the layer's width; null before allocation, or under per-linear "
        "allocation when its linears got different widths (see linears)"
    )
    scores: dict[str, Any]
    quant_error: dict[str, Any] | None = None
    linears: list[LinearOut] = Field(
        default=[], description="each linear's own quant_error and, under allocation_unit 'linear', its bits"
    )

    @classmethod
    def of(cls, row: ProfileLayer) -> LayerOut:
        return cls(
            index=row.index,
            name=row.name,
            params=row.params,
            importance=row.importance,
            sensitivity=row.sensitivity,
            bits=row.bits,
            scores=row.scores or {},
            quant_error=row.quant_error,
            linears=[LinearOut(**x) for x in row.linears or []],
        )


class ProfileOut(BaseModel):
    job_id: str
    model: str
    method: str
    layers: list[LayerOut]


class ArtifactFileOut(BaseModel):
    name: str = Field(description="download name, e.g. `hf/model.safetensors`")
    size: int
    sha256: str


class ArtifactOut(BaseModel):
    name: str = Field(examples=["manifest.json", "hf", "model.gguf"])
    format: str = Field(examples=["json", "png", "hf", "gguf"])
    size: int = Field(description="bytes; for a directory, the size of its .tar download")
    sha256: str = Field(description="of the download; for a directory, of its .tar")
    kind: Literal["file", "directory"] = "file"
    files: list[ArtifactFileOut] | None = None

    @classmethod
    def of(cls, a: Artifact) -> ArtifactOut:
        files = None
        if a.kind == "directory":
            files = [
                ArtifactFileOut(name=f"{a.name}/{f['name']}", size=f["size"], sha256=f["sha256"]) for f in a.files or []
            ]
        return cls(
            name=a.name,
            format=a.format,
            size=a.size,
            sha256=a.sha256,
            kind=cast(Literal["file", "directory"], a.kind),
            files=files,
        )


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    rows: int
    sha256: str
    has_answers: bool
    size: int
    filename: str | None = None
    created_at: datetime

    @classmethod
    def render(cls, row: Any) -> dict[str, Any]:
        return cls.model_validate(row).model_dump(mode="json")


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    next_cursor: NextCursor


class ModelOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyOut(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed request (a body that cannot be parsed, an invalid cursor)",
        401: "missing or invalid API key",
        404: "not found (or another tenant's)",
        422: "invalid request",
        429: "a quota or the rate limit of the key (`Retry-After` when waiting helps)",
        503: "the database is unreachable (`database_unavailable`); retry later",
    }.items()
}


class WorkerOut(BaseModel):
    name: str = Field(description="host:pid of the worker process")
    worker_class: str
    device: str
    memory_bytes: int | None = Field(description="memory one job may use on this worker (its class's)")
    job_id: str | None = Field(description="the job it is running now; null when idle")
    started_at: datetime
    heartbeat_at: datetime


class WorkerClassOut(BaseModel):
    name: str
    device: str
    memory_bytes: int | None
    queue: str
    queued_jobs: int
    live_workers: int


class FleetOut(BaseModel):
    classes: list[WorkerClassOut]
    workers: list[WorkerOut]
