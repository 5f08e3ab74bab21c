"""API keys: ``TAQ_API_KEYS`` (``tenant:key,…``) and DB-managed keys (hashed at rest).

``TAQ_AUTH`` decides whether keys are required (``Authenticator``); when they are, every /v1 call
needs ``Authorization: Bearer <key>``. Keyless (loopback dev only) there is one tenant, ``default``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.errors import Forbidden, NotFound, Unauthorized
from common.ids import new_id
from common.orm import ApiKey, utcnow
from common.settings import DEFAULT_TENANT, TENANT_RE, Settings, UnsafeConfig, is_loopback

KEY_PREFIX = "taq_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_rows_exist(session: Session) -> bool:
    """Whether any API key was ever created in the database, revoked ones included (rows are
    never deleted): a deployment that has had keys keeps needing them."""
    return session.execute(select(ApiKey.id).limit(1)).first() is not None


class Authenticator:
    """Who is calling, failing closed.

    ``TAQ_AUTH=required`` (and ``TAQ_ENV=production``): every /v1 call needs a valid key, however
    many keys exist, so revoking the last key leaves the API answering 401. ``TAQ_AUTH=off``: the
    keyless single-tenant mode, refused outside loopback and in production. ``auto`` (default):
    keyless only while no key has ever been configured (env or database); the first key latches
    auth on for good. Valid keys are cached for ``TAQ_AUTH_CACHE_SECONDS`` (no database read per
    request); a revoked key stops working within that time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._required = settings.auth == "required" or settings.env == "production" or bool(settings.api_key_map)
        self._cache: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def required(self, session: Session) -> bool:
        if self.settings.auth == "off":
            return False
        if not self._required and key_rows_exist(session):
            self._required = True  # a latch: never back to keyless while this process runs
        return self._required

    def _known_tenant(self, key: str) -> str | None:
        """The tenant of `key` from TAQ_API_KEYS or the cache of valid database keys."""
        for known, tenant in self.settings.api_key_map.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return tenant
        with self._lock:
            cached = self._cache.get(hash_key(key))
        return cached[0] if cached is not None and cached[1] > time.monotonic() else None

    def tenant_for_key(self, session: Session, key: str) -> str | None:
        tenant = self._known_tenant(key)
        if tenant is not None:
            return tenant
        digest = hash_key(key)
        row = session.execute(
            select(ApiKey.tenant).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
        ).first()
        if row is None:
            return None
        with self._lock:
            if len(self._cache) >= _MAX_CACHED_KEYS:
                self._cache.clear()
            self._cache[digest] = (row.tenant, time.monotonic() + self.settings.auth_cache_seconds)
        found: str = row.tenant
        return found

    def cached_tenant(self, authorization: str | None) -> str | None:
        """The tenant when it is known without the database (auth latched on and the key in
        TAQ_API_KEYS or cached); None when the full check must run."""
        if self.settings.auth == "off" or not self._required:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return self._known_tenant(key.strip())

    def authenticate(self, session: Session, authorization: str | None) -> str:
        """The tenant of the caller; raises Unauthorized. Keyless: the ``default`` tenant."""
        if not self.required(session):
            return DEFAULT_TENANT
        key = _bearer_key(authorization)
        tenant = self.tenant_for_key(session, key)
        if tenant is None:
            raise Unauthorized("invalid or revoked API key")
        return tenant

    def authorize_operator(self, session: Session, authorization: str | None) -> None:
        """Operator views (GET /v1/workers) need the operator key, TAQ_ADMIN_KEY; keyless, they
        are open like everything else. A tenant key is not enough: the view names every tenant's
        running jobs."""
        key = (authorization or "").partition(" ")[2].strip()
        if self.settings.admin_key and bearer_matches(authorization, self.settings.admin_key):
            return
        if not self.required(session):
            return
        if not key:
            raise Unauthorized(
                "this operator view needs the operator key: send 'Authorization: Bearer <TAQ_ADMIN_KEY>'"
            )
        if self.tenant_for_key(session, key) is None:
            raise Unauthorized("invalid or revoked API key")
        raise Forbidden("this operator view needs the operator key (TAQ_ADMIN_KEY), not a tenant's API key")


_MAX_CACHED_KEYS = 4096


def bearer_matches(authorization: str | None, secret: str) -> bool:
    """Whether the header is `Bearer <secret>` (constant-time compare)."""
    scheme, _, key = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(secret.encode(), key.strip().encode())


def _bearer_key(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("this service needs an API key: send 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    return key.strip()


@dataclass(frozen=True)
class CreatedKey:
    id: str
    tenant: str
    key: str  # shown once, never stored


def create_key(session: Session, tenant: str, name: str | None = None) -> CreatedKey:
    if not TENANT_RE.match(tenant):
        raise ValueError("tenant names use lower-case letters, digits, '_', '-', '.' (max 64)")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), tenant=tenant, key_hash=hash_key(key), prefix=key[:10], name=name)
    session.add(row)
    session.flush()
    return CreatedKey(row.id, tenant, key)


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.execute(select(ApiKey).order_by(ApiKey.created_at)).scalars())


def revoke_key(session: Session, key_id: str) -> None:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"API key {key_id} not found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()


def assert_auth_configured(settings: Settings, session: Session, host: str | None = None) -> None:
    """Refuse to serve without auth in production, or on a non-loopback address."""
    if settings.auth == "off":
        _keyless_only_on_loopback(
            settings,
            host,
            in_production="TAQ_AUTH=off is refused in production",
            exposed=f"refusing to bind {host} with TAQ_AUTH=off: the keyless mode is for loopback "
            "only; bind 127.0.0.1 or set TAQ_AUTH=required with keys",
        )
        return
    if settings.api_key_map or key_rows_exist(session) or settings.auth == "required":
        return
    _keyless_only_on_loopback(
        settings,
        host,
        in_production="production needs API keys: set TAQ_API_KEYS or run 'taq admin create-key'",
        exposed=f"refusing to bind {host} with auth off: set TAQ_API_KEYS (tenant:key,…) "
        "or create a key with 'taq admin create-key', or bind 127.0.0.1",
    )


def _keyless_only_on_loopback(settings: Settings, host: str | None, *, in_production: str, exposed: str) -> None:
    """A service without keys runs in development on a loopback address only: UnsafeConfig with
    `in_production` in production, with `exposed` when `host` (the address to bind) is another."""
    if settings.env == "production":
        raise UnsafeConfig(in_production)
    if host is not None and not is_loopback(host):
        raise UnsafeConfig(exposed)
