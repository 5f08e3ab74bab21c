"""/v1/datasets: upload calibration / eval data (JSONL), list and delete it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, Response, UploadFile
from fastapi.responses import JSONResponse

from api.deps import CurrentTenant, SessionDep, SettingsDep, StorageDep
from api.idempotency import KEY_REUSED, IdempotencyKeyHeader, created_response
from api.schemas import ERROR_RESPONSES, DatasetOut, DatasetPage, ErrorResponse
from common import datasets as service
from common import retention
from common.errors import PayloadTooLarge

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)


@router.post(
    "",
    operation_id="upload_dataset",
    status_code=201,
    response_model=DatasetOut,
    responses={**KEY_REUSED, 413: {"model": ErrorResponse, "description": "file too large"}},
)
def upload_dataset(
    file: Annotated[UploadFile, File(description="JSONL, one row a line")],
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    """Validate every line and store the file content-addressed; bad rows answer 422 with line numbers."""
    data = file.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"dataset larger than {settings.max_upload_bytes} bytes (TAQ_MAX_UPLOAD_BYTES)")
    stored = service.create_dataset(
        session, storage, settings, tenant, data, file.filename, DatasetOut.render, idempotency_key
    )
    return created_response(stored)


@router.get("", operation_id="list_datasets", response_model=DatasetPage)
def list_datasets(
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    limit: Annotated[int | None, Query(ge=1)] = None,
    cursor: str | None = None,
) -> DatasetPage:
    """Datasets of the caller, newest first; follow `next_cursor` for more."""
    rows, next_cursor = retention.list_datasets(session, settings, tenant, limit=limit, cursor=cursor)
    return DatasetPage(items=[DatasetOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.delete(
    "/{dataset_id}",
    operation_id="delete_dataset",
    status_code=204,
    response_class=Response,
    responses={409: {"model": ErrorResponse, "description": "a queued or running job uses it"}},
)
def delete_dataset(dataset_id: str, session: SessionDep, storage: StorageDep, tenant: CurrentTenant) -> Response:
    """Delete a dataset (409 `dataset_in_use` while a queued or running job reads it)."""
    retention.delete_dataset(session, storage, tenant, dataset_id)
    return Response(status_code=204)
