"""What the service benchmarks (bench_api.py, soak.py) share: a throw-away PostgreSQL database on
the local server, free ports, and stopping the processes they started."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_ADMIN_DSN = os.environ.get("TAQ_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_URL = os.environ.get("TAQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/{db}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def temporary_database(prefix: str) -> Iterator[tuple[str, str]]:
    """(name, SQLAlchemy URL) of a fresh database, dropped afterwards (with this process's pools)."""
    import psycopg

    from common.db import dispose_engines

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name, PG_URL.format(db=name)
    finally:
        dispose_engines()
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def stop_all(procs: list[subprocess.Popen], grace: float = 30) -> None:
    """SIGTERM each process group, SIGKILL what is still there after `grace` seconds."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def write_summary(summary: dict, path: Path | None) -> None:
    print(json.dumps(summary))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
