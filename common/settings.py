"""The one typed configuration object (environment, prefix ``TAQ_``).

Defaults are the *embedded* profile: everything under ``TAQ_DATA_DIR`` (SQLite, a filesystem
broker, ``file://`` objects), so ``taq serve`` works with no server. ``TAQ_ENV=production``
refuses configurations that are only safe on one loopback machine.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.worker_classes import DEFAULT_WORKER_CLASS, WorkerClass, parse_worker_classes

TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
DEFAULT_TENANT = "default"
#: TAQ_LIMITS_REDIS_URL: the schemes redis-py opens, and the value that keeps the limits in-process
REDIS_SCHEMES = ("redis", "rediss", "unix")
LOCAL_LIMITS = "local"


class UnsafeConfig(ValueError):
    """A configuration that must not run in production (or at all)."""


def parse_api_keys(raw: str) -> dict[str, str]:
    """``tenant:key,tenant2:key2`` -> {key: tenant}. Keys are secrets: never log this mapping."""
    keys: dict[str, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        tenant, sep, key = item.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not key or not TENANT_RE.match(tenant):
            raise ValueError(
                "TAQ_API_KEYS must look like 'tenant:key,tenant2:key2' "
                "(tenant: lower-case letters, digits, '_', '-', '.')"
            )
        if len(key) < 16:
            raise ValueError(f"the API key of tenant '{tenant}' is shorter than 16 characters")
        if key in keys and keys[key] != tenant:
            raise ValueError("one API key is given to two tenants")
        keys[key] = tenant
    return keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TAQ_", extra="ignore", validate_default=True)

    env: Literal["dev", "production"] = "dev"
    data_dir: Path = Path("./.taq")
    database_url: str = ""
    broker_url: str = ""
    storage_url: str = ""
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    #: optional JSON file {"model id": "/path/to/dir-or-file.gguf"} added to the packaged models
    model_registry: Path | None = None
    api_keys: str = Field(default="", repr=False)
    #: required: every /v1 call needs a key, however many exist (revoking the last one leaves the
    #: API refusing everything); off: keyless single tenant, loopback and dev only; auto: keyless
    #: until a first key is configured, then required for good (production: always required)
    auth: Literal["auto", "required", "off"] = "auto"
    #: how long a valid database key is trusted without reading the database again (a revoked key
    #: stops working within this time)
    auth_cache_seconds: float = Field(default=5.0, ge=0)
    #: the operator key: `Authorization: Bearer <it>` reads operator views (GET /v1/workers)
    admin_key: str = Field(default="", repr=False)
    #: when set, GET /metrics needs `Authorization: Bearer <it>` (scrapers send it)
    metrics_key: str = Field(default="", repr=False)
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    #: answer artifact downloads from S3 with a redirect to a presigned URL
    s3_presign_downloads: bool = False
    allow_pickle: bool = False
    log_level: str = "INFO"
    log_json: bool = True

    #: pooled PostgreSQL connections per process (+ overflow). The API runs its sync routes on as
    #: many threads as the pool holds, so a request never waits for a connection
    db_pool_size: int = Field(default=20, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)

    # API limits
    max_page_size: int = Field(default=100, ge=1, le=1000)
    default_page_size: int = Field(default=20, ge=1, le=1000)
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    #: any other request body (JSON); declared or streamed (chunked) bodies over it answer 413
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    #: rows (non-blank lines) one dataset may hold; more answers 422 ``too_many_rows``
    max_dataset_rows: int = Field(default=100_000, ge=1)
    #: tokens one prompt (or one answer) may have. Datasets are uploaded without a model, so it is
    #: enforced on UTF-8 bytes, an upper bound on the tokens of any tokenizer the service loads
    #: (byte-level BPE / byte-fallback SentencePiece emit at most one token per byte)
    max_prompt_tokens: int = Field(default=32768, ge=16)
    #: jobs a tenant may have waiting in the queue; one more answers 429
    max_queued_jobs_per_tenant: int = Field(default=50, ge=1)
    #: jobs (any status) and datasets a tenant may keep; more answer 429 (delete some first)
    max_jobs_per_tenant: int = Field(default=10_000, ge=1)
    max_datasets_per_tenant: int = Field(default=1_000, ge=1)
    #: bytes a tenant may keep in storage (datasets + artifacts); over it uploads and submits answer 413
    max_stored_bytes_per_tenant: int = Field(default=200 << 30, ge=1)
    #: keep a succeeded job's work files (layer checkpoints, stage markers) instead of deleting them
    #: at publish; for inspection only: they can be as large as the model at every bit width
    keep_work_files: bool = False
    #: finished jobs and unused datasets older than this are deleted by the workers' reaper; unset: kept
    retention_days: float | None = Field(default=None, gt=0)
    #: per-API-key token bucket: sustained requests per second and burst; 0 turns it off
    rate_limit_per_second: float = Field(default=50.0, ge=0)
    rate_limit_burst: int = Field(default=500, ge=1)
    sse_max_seconds: float = Field(default=600.0, gt=0)
    #: event streams open at once per tenant / in all; more answer 429 with Retry-After
    max_streams_per_tenant: int = Field(default=8, ge=1)
    max_streams: int = Field(default=64, ge=1)
    #: where the rate limit and the stream caps are kept, shared by every API replica: a Redis URL;
    #: empty: the broker's Redis when TAQ_BROKER_URL is one, else this process; ``local``: this
    #: process even with a Redis broker (each replica then grants its own allowance)
    limits_redis_url: str = Field(default="", repr=False)
    #: prefix of the limiter's Redis keys (deployments sharing one Redis use different ones)
    limits_key_prefix: str = Field(default="taq:limits:", min_length=1)
    #: an open event stream holds a lease in Redis for this long, renewed while it stays open, so
    #: a replica that dies without closing its streams frees their slots within it
    stream_lease_seconds: float = Field(default=30.0, ge=1)
    sse_poll_seconds: float = Field(default=0.5, gt=0)

    # worker / lifecycle
    worker_device: Literal["auto", "cpu", "cuda"] = "auto"
    #: the worker fleet, ``name=device:memory,…`` (e.g. ``cpu=cpu:24GiB,gpu80=cuda:80GiB``); each
    #: job goes to the smallest class whose memory holds it. Empty: one class ``default`` made of
    #: TAQ_WORKER_DEVICE and TAQ_WORKER_MEMORY_BYTES
    worker_classes: str = ""
    #: the class a worker process serves (``taq worker --class NAME`` sets it)
    worker_class: str | None = None
    #: memory one worker may use for a job (RAM; the GPU's memory for CUDA workers). None = the
    #: total RAM of the machine the API runs on. A job whose estimate exceeds it answers 422.
    worker_memory_bytes: int | None = Field(default=None, ge=1)
    #: hidden states a job's layer pass keeps in memory (on the worker's device) before spilling
    #: the rest to files under TAQ_DATA_DIR/work; probe-stream methods (taq_kl, taqo) carry one
    #: stream per layer, so this bounds their memory
    activation_ram_bytes: int = Field(default=1 << 30, ge=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    stale_after_seconds: float = Field(default=120.0, gt=0)
    requeue_queued_after_seconds: float = Field(default=300.0, gt=0)
    reaper_interval_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    cancel_poll_seconds: float = Field(default=1.0, gt=0)
    progress_event_seconds: float = Field(default=3.0, ge=0)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # absolute so that the API and the worker subprocess agree whatever their cwd
        return value.expanduser().resolve()

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(p).expanduser() for p in value.split(":") if p.strip()]
        return value

    @field_validator("api_keys", "worker_classes")
    @classmethod
    def _parses(cls, value: str, info: ValidationInfo) -> str:
        parse = parse_api_keys if info.field_name == "api_keys" else parse_worker_classes
        parse(value)  # refuses what it cannot parse; kept as written (api_key_map, fleet() parse it)
        return value

    @field_validator("admin_key", "metrics_key")
    @classmethod
    def _secret_long(cls, value: str, info: ValidationInfo) -> str:
        if value and len(value) < 16:
            raise ValueError(f"TAQ_{(info.field_name or '').upper()} is shorter than 16 characters")
        return value

    @field_validator("limits_redis_url")
    @classmethod
    def _limits_url(cls, value: str) -> str:
        value = value.strip()
        if value not in ("", LOCAL_LIMITS) and urlparse(value).scheme not in REDIS_SCHEMES:
            raise ValueError(
                "TAQ_LIMITS_REDIS_URL must be a redis://, rediss:// or unix:// URL, 'local' (limits kept in "
                "each API process) or empty (the broker's Redis when TAQ_BROKER_URL is one)"
            )
        return value

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        d = self.data_dir
        if not self.database_url:
            self.database_url = f"sqlite:///{d / 'taq.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if not self.storage_url:
            self.storage_url = f"file://{d / 'objects'}"
        if not self.model_roots:
            self.model_roots = [d / "models"]
        self.model_roots = [p.expanduser().resolve() for p in self.model_roots]
        if self.default_page_size > self.max_page_size:
            self.default_page_size = self.max_page_size
        return self

    # ---- derived --------------------------------------------------------------------------
    @property
    def api_key_map(self) -> dict[str, str]:
        return parse_api_keys(self.api_keys)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def broker_scheme(self) -> str:
        return urlparse(self.broker_url).scheme.split("+")[0]

    @property
    def limits_redis(self) -> str | None:
        """The Redis URL the API's rate limit and stream caps share, or None: kept in-process."""
        if self.limits_redis_url == LOCAL_LIMITS:
            return None
        if self.limits_redis_url:
            return self.limits_redis_url
        return self.broker_url if urlparse(self.broker_url).scheme in ("redis", "rediss") else None

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def broker_transport_options(self) -> dict[str, object]:
        if self.broker_scheme == "filesystem":
            queue = str(self.broker_dir / "queue")
            return {
                "data_folder_in": queue,
                "data_folder_out": queue,
                "control_folder": str(self.broker_dir / "control"),
                "store_processed": False,
            }
        if self.broker_scheme in ("redis", "rediss"):
            # a long visibility timeout: with acks_late an unacked quantization job must not be
            # redelivered to another worker while it is still running
            return {"visibility_timeout": 6 * 3600}
        return {}

    def ensure_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        default_models = self.data_dir / "models"
        if default_models in self.model_roots:
            default_models.mkdir(exist_ok=True)
        if self.is_sqlite:
            db_path = self.sqlite_path
            if db_path is not None:
                db_path.parent.mkdir(parents=True, exist_ok=True)
        if self.broker_scheme == "filesystem":
            for key in ("data_folder_in", "data_folder_out", "control_folder"):
                Path(str(self.broker_transport_options[key])).mkdir(parents=True, exist_ok=True)

    def worker_memory_limit(self) -> tuple[int, str] | None:
        """(bytes, where the number came from) for the memory preflight; None when unknown."""
        if self.worker_memory_bytes is not None:
            return self.worker_memory_bytes, "TAQ_WORKER_MEMORY_BYTES"
        total = detected_memory_bytes()
        return (total, "detected total RAM of the API machine") if total else None

    def fleet(self) -> list[WorkerClass]:
        """The declared worker classes, smallest memory first; or the one ``default`` class."""
        declared = parse_worker_classes(self.worker_classes)
        if declared:
            return sorted(declared, key=lambda c: (c.memory_bytes or 0, c.name))
        limit = self.worker_memory_limit()
        return [
            WorkerClass(
                DEFAULT_WORKER_CLASS, self.worker_device, limit[0] if limit else None, limit[1] if limit else "unknown"
            )
        ]

    def find_worker_class(self, name: str) -> WorkerClass | None:
        return next((c for c in self.fleet() if c.name == name), None)

    def queue_class(self, name: str | None) -> WorkerClass:
        """The class whose queue a job of class `name` goes to: its own, or the largest class when
        `name` is not (or no longer) declared (jobs from before the classes existed)."""
        found = self.find_worker_class(name) if name else None
        return found or self.fleet()[-1]

    def own_worker_class(self) -> WorkerClass:
        """The class this worker process serves (TAQ_WORKER_CLASS); with one class, that one.
        Raises ValueError naming the declared classes."""
        fleet = self.fleet()
        names = ", ".join(c.name for c in fleet)
        if self.worker_class is None:
            if len(fleet) == 1:
                return fleet[0]
            raise ValueError(
                f"TAQ_WORKER_CLASSES declares several classes ({names}); start the worker with --class NAME"
            )
        found = self.find_worker_class(self.worker_class)
        if found is None:
            raise ValueError(
                f"worker class '{self.worker_class}' is not declared (declared: {names}); "
                "add it to TAQ_WORKER_CLASSES as name=device:memory"
            )
        return found

    @property
    def sqlite_path(self) -> Path | None:
        if not self.is_sqlite:
            return None
        path = self.database_url.split("///", 1)[-1]
        return None if path in ("", ":memory:") else Path(path)

    def check_production(self) -> None:
        """Raise UnsafeConfig listing every setting that is unsafe for ``TAQ_ENV=production``.

        API keys may also live in the database (``taq admin create-key``); that part is checked
        where the database is reachable (``common.auth.assert_auth_configured``).
        """
        problems = []
        if self.is_sqlite:
            problems.append("TAQ_DATABASE_URL is SQLite; use postgresql+psycopg://…")
        if self.broker_scheme in ("filesystem", "memory", "sqla", "sqlalchemy", "db"):
            problems.append(f"TAQ_BROKER_URL uses the '{self.broker_scheme}' transport; use redis://…")
        if self.auth == "off":
            problems.append("TAQ_AUTH=off (the keyless mode is for loopback development only)")
        if problems:
            raise UnsafeConfig("unsafe production configuration: " + "; ".join(problems))


def detected_memory_bytes() -> int | None:
    """Total physical RAM of this machine (POSIX sysconf), or None where it is not available."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; in production, unsafe configurations raise UnsafeConfig."""
    settings = Settings()
    if settings.env == "production":
        settings.check_production()
    return settings
