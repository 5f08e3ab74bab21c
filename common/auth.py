"""API keys: ``TAQ_API_KEYS`` (``tenant:key,…``) and DB-managed keys (hashed at rest).

Auth is *on* as soon as either source has a key; then every /v1 call needs
``Authorization: Bearer <key>``. With auth off there is a single tenant, ``default``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
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


def db_keys_exist(session: Session) -> bool:
    return session.execute(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)).first() is not None


def auth_enabled(settings: Settings, session: Session) -> bool:
    return bool(settings.api_key_map) or db_keys_exist(session)


def tenant_for_key(settings: Settings, session: Session, key: str) -> str | None:
    for known, tenant in settings.api_key_map.items():
        if hmac.compare_digest(known.encode(), key.encode()):
            return tenant
    row = session.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(key),
                                               ApiKey.revoked_at.is_(None))).scalar_one_or_none()
    return row.tenant if row is not None else None


def authenticate(settings: Settings, session: Session, authorization: str | None) -> str:
    """The tenant of the caller; raises Unauthorized. With auth off, the ``default`` tenant."""
    if not auth_enabled(settings, session):
        return DEFAULT_TENANT
    if not authorization:
        raise Unauthorized("this service needs an API key: send 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    tenant = tenant_for_key(settings, session, key.strip())
    if tenant is None:
        raise Unauthorized("invalid or revoked API key")
    return tenant


def authorize_operator(settings: Settings, session: Session, authorization: str | None) -> None:
    """Operator views (GET /v1/workers) need the operator key, TAQ_ADMIN_KEY; with auth off (the
    keyless loopback mode) they are open like everything else. A tenant key is not enough: the
    view names every tenant's running jobs."""
    scheme, _, key = (authorization or "").partition(" ")
    key = key.strip()
    if settings.admin_key and scheme.lower() == "bearer" and hmac.compare_digest(
            settings.admin_key.encode(), key.encode()):
        return
    if not auth_enabled(settings, session):
        return
    if not key:
        raise Unauthorized("this operator view needs the operator key: send 'Authorization: Bearer "
                           "<TAQ_ADMIN_KEY>'")
    if tenant_for_key(settings, session, key) is None:
        raise Unauthorized("invalid or revoked API key")
    raise Forbidden("this operator view needs the operator key (TAQ_ADMIN_KEY), not a tenant's API key")


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
    if auth_enabled(settings, session):
        return
    if settings.env == "production":
        raise UnsafeConfig("production needs API keys: set TAQ_API_KEYS or run 'taq admin create-key'")
    if host is not None and not is_loopback(host):
        raise UnsafeConfig(f"refusing to bind {host} with auth off: set TAQ_API_KEYS (tenant:key,…) "
                           "or create a key with 'taq admin create-key', or bind 127.0.0.1")
