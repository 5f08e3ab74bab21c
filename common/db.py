"""Engine, sessions and migrations. Alembic is the only path that changes the schema."""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from common.settings import Settings

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # API and worker processes write concurrently
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, *, pool_size: int = 20, max_overflow: int = 20) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre-ping: a pooled connection that died (database restart, network cut) is replaced before
    # use, so the service recovers from an outage without a restart; connect_timeout bounds a
    # connection attempt to an unreachable host (503 instead of a hung request)
    connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=1800,
        pool_timeout=10,
        connect_args=connect_args,
    )


def get_engine(settings: Settings) -> Engine:
    with _lock:
        engine = _engines.get(settings.database_url)
        if engine is None:
            settings.ensure_dirs()
            engine = _engines[settings.database_url] = make_engine(
                settings.database_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow
            )
        return engine


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()


_factories: dict[str, sessionmaker[Session]] = {}


def session_factory(settings: Settings) -> sessionmaker[Session]:
    """One sessionmaker per database (built once: this runs for every request)."""
    factory = _factories.get(settings.database_url)
    if factory is None:
        engine = get_engine(settings)
        with _lock:
            factory = _factories.setdefault(settings.database_url, sessionmaker(bind=engine, expire_on_commit=False))
    return factory


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def check_database(settings: Settings) -> None:
    with get_engine(settings).connect() as conn:
        conn.execute(text("SELECT 1"))


# ---- migrations ------------------------------------------------------------------------------
def migrations_dir() -> Path:
    """The Alembic script directory, from the installed ``migrations`` package or the checkout."""
    spec = importlib.util.find_spec("migrations")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0])
        if (candidate / "env.py").is_file():
            return candidate
    candidate = Path(__file__).resolve().parent.parent / "migrations"
    if (candidate / "env.py").is_file():
        return candidate
    raise RuntimeError("Alembic migrations not found (neither the 'migrations' package nor ./migrations)")


def alembic_config(settings: Settings) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    # '%' is ConfigParser interpolation: escape it in passwords
    config.set_main_option("sqlalchemy.url", settings.database_url.replace("%", "%%"))
    config.attributes["taq_settings"] = settings
    return config


def migrate(settings: Settings, revision: str = "head") -> None:
    """``alembic upgrade head``; on PostgreSQL under an advisory lock so that an API and a worker
    starting together do not race."""
    from alembic import command

    settings.ensure_dirs()
    config = alembic_config(settings)
    engine = get_engine(settings)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(727274)"))
            conn.commit()
        try:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            conn.commit()
        finally:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(727274)"))
                conn.commit()
    log.info("database migrated", extra={"revision": revision})


def current_revision(settings: Settings) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(settings).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
