#!/bin/sh
# Migrates the database (alembic upgrade head, under a PostgreSQL advisory lock), refuses unsafe
# production settings (no API keys, SQLite, filesystem broker), then serves the API.
set -eu
exec taq api "$@"
