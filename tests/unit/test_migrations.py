"""Alembic is the only schema path: the migrated schema equals the ORM's metadata (a column added
to common/orm.py without a migration, or the reverse, fails here)."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from common.db import migrate
from common.orm import Base
from common.settings import Settings

pytestmark = pytest.mark.unit


def test_migrations_match_the_orm(tmp_path):
    settings = Settings(data_dir=tmp_path)
    migrate(settings)
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
