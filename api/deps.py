"""Request dependencies: settings, DB session, storage and the caller's tenant."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated

import anyio
import sqlalchemy.exc
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from common.db import session_factory, session_scope
from common.settings import Settings
from common.storage import Storage

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


# cheap dependencies are `async def`: FastAPI runs a sync dependency on a worker thread, and a
# thread hop per dependency per request is what made the hot read path slow under load
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_session(request: Request) -> AsyncIterator[Session]:
    # creating a session does no I/O (it connects on first use, on the route's thread); ending it
    # may talk to the database, so that runs on a thread
    session = session_factory(request.app.state.settings)()
    try:
        yield session
    except BaseException:
        await anyio.to_thread.run_sync(_quietly, session.rollback)
        raise
    finally:
        await anyio.to_thread.run_sync(_quietly, session.close)


def _quietly(end: Callable[[], None]) -> None:
    """Roll back / close a session whose connection may have died meanwhile (database outage).
    This runs after the response was sent: raising here would only reset the client's
    keep-alive connection. SQLAlchemy has already invalidated a dead connection, so the pool
    does not hand it out again."""
    try:
        end()
    except sqlalchemy.exc.SQLAlchemyError as exc:
        log.warning("could not end the database session", extra={"error": type(exc).__name__})


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SessionDep = Annotated[Session, Depends(get_session)]


async def get_tenant(
    request: Request,
    settings: SettingsDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> str:
    # a cached key needs no database: answered on the event loop. Otherwise a short session of
    # its own on a thread (never the request's: a route that streams for minutes must not hold a
    # pooled connection for its whole life). The HTTPBearer dependency documents the scheme in
    # OpenAPI; the raw header is checked here
    authorization = request.headers.get("authorization")
    authenticator = request.app.state.authenticator
    tenant = authenticator.cached_tenant(authorization)
    if tenant is None:
        tenant = await anyio.to_thread.run_sync(_authenticate, settings, authenticator, authorization)
    await request.app.state.rate_limiter.hit(authorization, tenant)  # 429 rate_limited
    return tenant


def _authenticate(settings: Settings, authenticator, authorization: str | None) -> str:
    with session_scope(settings) as session:
        return authenticator.authenticate(session, authorization)


CurrentTenant = Annotated[str, Depends(get_tenant)]


def require_operator(
    request: Request,
    settings: SettingsDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> None:
    with session_scope(settings) as session:
        request.app.state.authenticator.authorize_operator(session, request.headers.get("authorization"))


Operator = Annotated[None, Depends(require_operator)]
