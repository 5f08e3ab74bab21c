"""Model registry glue: which model ids this deployment may load.

The registry is the packaged PyPI models (core.packaged_models) plus an optional operator file
``TAQ_MODEL_REGISTRY`` (JSON ``{"id": "/path"}``); everything else resolves inside
``TAQ_MODEL_ROOTS`` (core.models.resolve_model enforces the allow-list).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.settings import Settings

if TYPE_CHECKING:
    from core.models import ModelSource

log = logging.getLogger(__name__)


def assembled_models_dir(settings: Settings) -> Path:
    return settings.data_dir / "packaged-models"


def model_registry(settings: Settings) -> dict[str, Path]:
    from core.packaged_models import packaged_models

    registry = dict(packaged_models(assembled_models_dir(settings)))
    if settings.model_registry is not None:
        try:
            extra = json.loads(Path(settings.model_registry).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"TAQ_MODEL_REGISTRY {settings.model_registry} is unreadable: {exc}") from exc
        if not isinstance(extra, dict):
            raise ValueError('TAQ_MODEL_REGISTRY must hold a JSON object {"id": "/path"}')
        registry.update({str(k): Path(v).expanduser() for k, v in extra.items()})
    return registry


def resolve_model(settings: Settings, model_id: str) -> ModelSource:
    """core.models.resolve_model with this deployment's roots and registry (ModelNotFound / UnsafeModel)."""
    from core.errors import ModelNotFound
    from core.models import resolve_model as core_resolve

    try:
        return core_resolve(
            model_id, list(settings.model_roots), model_registry(settings), allow_pickle=settings.allow_pickle
        )
    except ModelNotFound as exc:
        if not (isinstance(exc.details, dict) and "tried" in exc.details):
            raise  # a specific reason (e.g. a directory without weights); the API cuts any path
        # the places tried are server paths: they go to the log (with the request id), not to the caller
        log.info("model not found", extra={"model": model_id, "tried": exc.message})
        raise ModelNotFound(
            f"model '{model_id}' not found: it is not a packaged model, a registry entry or a "
            "model directory under TAQ_MODEL_ROOTS; GET /v1/models lists the ids this "
            "deployment can load",
            details={"model": model_id},
        ) from None


def _source_dict(source: Any) -> dict[str, Any]:
    if hasattr(source, "to_dict"):
        data = dict(source.to_dict())
    elif hasattr(source, "__dataclass_fields__"):
        from dataclasses import asdict

        data = asdict(source)
    else:
        data = {"id": str(source)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Path) or key in ("path", "file", "directory"):
            continue  # never reveal server paths to API clients
        out[key] = value
    out.setdefault("id", getattr(source, "model_id", None) or getattr(source, "id", None))
    return out


def list_available(settings: Settings) -> list[dict[str, Any]]:
    from core.models import list_models

    return sorted(
        (_source_dict(s) for s in list_models(list(settings.model_roots), model_registry(settings))),
        key=lambda d: str(d.get("id")),
    )


def source_sha256(settings: Settings, source: ModelSource) -> str:
    """The model's content hash (core.models.ModelSource.compute_sha256), cached under
    ``$TAQ_DATA_DIR/cache/source-sha256.json`` by file names, sizes and mtimes, so a 140 GB
    checkpoint is hashed once per version rather than once per job."""
    import os
    import tempfile

    cache_file = settings.data_dir / "cache" / "source-sha256.json"
    key = str(Path(source.file).resolve())
    signature = [list(entry) for entry in source.content_signature()]
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key) if isinstance(cache, dict) else None
    if isinstance(entry, dict) and entry.get("signature") == signature and isinstance(entry.get("sha256"), str):
        cached: str = entry["sha256"]
        source.content_sha256 = cached
        return cached
    digest = source.compute_sha256()
    cache = cache if isinstance(cache, dict) else {}
    cache[key] = {"signature": signature, "sha256": digest}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".source-sha256-")
        with os.fdopen(fd, "w") as fh:
            json.dump(cache, fh, sort_keys=True)
        os.replace(tmp, cache_file)
    except OSError:
        log.warning("could not write the source hash cache", exc_info=True)
    return digest
