"""Alembic migrations (a package so that they ship inside the wheel)."""
