"""Request dependencies: settings, DB session, storage and the caller's tenant."""

from __future__ import annotations

import logging
from typing import Annotated, Callable, Iterator

import sqlalchemy.exc
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from common.db import session_factory, session_scope
from common.settings import Settings
from common.storage import Storage

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_session(request: Request) -> Iterator[Session]:
    session = session_factory(request.app.state.settings)()
    try:
        yield session
    except BaseException:
        _quietly(session.rollback)
        raise
    finally:
        _quietly(session.close)


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


def get_tenant(request: Request, settings: SettingsDep,
               _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None) -> str:
    # a short session of its own (a cached key reads nothing): a route that streams for minutes
    # must not hold a pooled connection for its whole life. The HTTPBearer dependency documents
    # the scheme in OpenAPI; the raw header is checked here
    authorization = request.headers.get("authorization")
    with session_scope(settings) as session:
        tenant = request.app.state.authenticator.authenticate(session, authorization)
    request.app.state.rate_limiter.hit(authorization, tenant)  # 429 rate_limited
    return tenant


CurrentTenant = Annotated[str, Depends(get_tenant)]


def require_operator(request: Request, settings: SettingsDep,
                     _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None) -> None:
    with session_scope(settings) as session:
        request.app.state.authenticator.authorize_operator(session, request.headers.get("authorization"))


Operator = Annotated[None, Depends(require_operator)]
