"""Alembic environment: the database URL comes from ``common.settings.Settings`` (``TAQ_``)
unless the caller passed a connection (``common.db.migrate``)."""

from __future__ import annotations

from alembic import context

from common.orm import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    settings = config.attributes.get("taq_settings")
    if settings is None:
        from common.settings import Settings

        settings = Settings()
    settings.ensure_dirs()
    return settings.database_url


def run_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    from common.db import make_engine

    engine = make_engine(_url())
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
