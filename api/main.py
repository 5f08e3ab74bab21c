"""The FastAPI application factory. Run with ``taq api`` (migrates first) or
``uvicorn --factory api.main:create_app``."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import ui
from api.errors import envelope, install_error_handlers, unexpected_error
from api.routes import datasets, health, jobs, models, workers
from api.shared_limits import build_limits
from common.auth import Authenticator, assert_auth_configured
from common.db import session_scope
from common.logging import request_id_var
from common.settings import Settings, get_settings
from common.storage import storage_from_settings

log = logging.getLogger("taq.api")

TAGS = [
    {"name": "jobs", "description": "Submit quantization jobs and fetch their profile and artifacts."},
    {"name": "datasets", "description": "Upload calibration / evaluation data."},
    {"name": "models", "description": "Models this deployment can load."},
    {"name": "ops", "description": "Health, readiness and metrics."},
]


class RequestContext:
    """Pure ASGI middleware: request id header, one structured access-log line per request, and
    413 for bodies over the limit: at once when the declared length is over it (before any
    parsing), and while reading for bodies without a length (chunked)."""

    def __init__(self, app, max_body: int = 8 * 1024 * 1024, max_upload: int = 64 * 1024 * 1024) -> None:
        self.app = app
        self.max_body = max_body
        self.max_upload = max_upload

    def _limit(self, scope) -> tuple[int, str]:
        if scope.get("path") == "/v1/datasets":  # multipart framing on top of the file
            return self.max_upload + 1024 * 1024, "TAQ_MAX_UPLOAD_BYTES"
        return self.max_body, "TAQ_MAX_REQUEST_BYTES"

    def _too_large(self, scope) -> int | None:
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if not declared or not declared.isdigit():
            return None
        limit, _ = self._limit(scope)
        return limit if int(declared) > limit else None

    def _counting(self, scope, receive):
        limit, setting = self._limit(scope)
        seen = {"bytes": 0}

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > limit:  # FastAPI re-raises HTTPException from body parsing
                    raise StarletteHTTPException(413, f"request body larger than {limit} bytes ({setting})")
            return message

        return counted

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming[:64] if incoming.isprintable() and incoming else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = {"code": 500, "started": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            limit = self._too_large(scope)
            if limit is not None:
                setting = self._limit(scope)[1]
                response = envelope(413, "payload_too_large", f"request body larger than {limit} bytes ({setting})")
                await response(scope, receive, send_wrapper)
            else:
                try:
                    await self.app(scope, self._counting(scope, receive), send_wrapper)
                except Exception as exc:
                    # answered here, not by Starlette's outermost handler, so the 500 (or 503) carries
                    # the request id in its header and body like every other error
                    if status["started"]:
                        raise
                    await unexpected_error(scope.get("path", ""), exc)(scope, receive, send_wrapper)
        finally:
            if scope.get("path") not in ("/healthz", "/metrics"):
                log.info(
                    "request",
                    extra={
                        "method": scope.get("method"),
                        "path": scope.get("path"),
                        "status": status["code"],
                        "ms": round((time.perf_counter() - started) * 1000, 1),
                    },
                )
            request_id_var.reset(token)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if settings.env == "production":
        settings.check_production()
    storage = storage_from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # sync routes run on AnyIO's thread pool: as many threads as pooled connections, so that
        # requests queue in the event loop (cheap) rather than in threads waiting for the pool
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.db_pool_size + settings.db_max_overflow
        if settings.env == "production":
            with session_scope(settings) as session:
                assert_auth_configured(settings, session)
        try:
            yield
        finally:
            await app.state.rate_limiter.aclose()
            app.state.streams.close()

    app = FastAPI(
        title="TAQ Service",
        version="1.0.0",
        openapi_tags=TAGS,
        lifespan=lifespan,
        description="Quantization-as-a-service for task-specialised LLMs: per-task layer "
        "sensitivity (TAQ, TAQ-KL, TAQO) and bit allocation under a budget.",
    )
    app.state.settings = settings
    app.state.storage = storage
    app.state.authenticator = Authenticator(settings)
    # shared by the API replicas through Redis when there is one (TAQ_LIMITS_REDIS_URL)
    app.state.rate_limiter, app.state.streams = build_limits(settings)
    install_error_handlers(app)
    for module in (jobs, datasets, models, workers, health):
        app.include_router(module.router)
    ui.install(app)  # the dashboard at /ui (static files; not in the OpenAPI document)
    app.add_middleware(RequestContext, max_body=settings.max_request_bytes, max_upload=settings.max_upload_bytes)
    _mark_file_uploads_binary(app)
    return app


def _mark_file_uploads_binary(app: FastAPI) -> None:
    """FastAPI describes UploadFile with OpenAPI 3.1's `contentMediaType` only; client generators
    (openapi-python-client) then type the part as text and send it without a filename, which is
    not a file upload. `format: binary` makes every generator emit a real file part."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for component in schema.get("components", {}).get("schemas", {}).values():
                for prop in component.get("properties", {}).values():
                    if prop.get("contentMediaType") == "application/octet-stream":
                        prop["format"] = "binary"
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to amend the schema
