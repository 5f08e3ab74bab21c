"""/v1/datasets: upload calibration / eval data (JSONL)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Header, UploadFile
from fastapi.responses import JSONResponse

from api.deps import CurrentTenant, SessionDep, SettingsDep, StorageDep
from api.schemas import ERROR_RESPONSES, DatasetOut, ErrorResponse
from common import datasets as service
from common.errors import PayloadTooLarge

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)


@router.post("", operation_id="upload_dataset", status_code=201, response_model=DatasetOut,
             responses={409: {"model": ErrorResponse, "description": "Idempotency-Key reused with another body"},
                        413: {"model": ErrorResponse, "description": "file too large"}})
def upload_dataset(file: Annotated[UploadFile, File(description="JSONL, one row a line")],
                   session: SessionDep, storage: StorageDep, settings: SettingsDep, tenant: CurrentTenant,
                   idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> JSONResponse:
    """Validate every line and store the file content-addressed; bad rows answer 422 with line numbers."""
    data = file.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"dataset larger than {settings.max_upload_bytes} bytes (TAQ_MAX_UPLOAD_BYTES)")
    stored = service.create_dataset(session, storage, settings, tenant, data, file.filename,
                                    DatasetOut.render, idempotency_key)
    headers = {"Idempotent-Replayed": "true"} if stored.replayed else None
    return JSONResponse(stored.body, status_code=stored.status_code, headers=headers)
