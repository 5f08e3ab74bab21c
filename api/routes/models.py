"""/v1/models: the model ids this deployment can load."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentTenant, SettingsDep
from api.schemas import ERROR_RESPONSES, ModelOut
from common.model_registry import list_available

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


@router.get("", operation_id="list_models", response_model=list[ModelOut])
def list_models(settings: SettingsDep, _tenant: CurrentTenant) -> list[ModelOut]:
    return [ModelOut(**m) for m in list_available(settings)]
