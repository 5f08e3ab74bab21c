"""``taq serve`` (API + worker on the embedded default), ``taq api``, ``taq worker``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Annotated

import typer

from cli.app import app

log = logging.getLogger("taq.cli")


def _prepare(migrate: bool = True):
    from common.db import migrate as run_migrations
    from common.logging import configure_logging
    from common.settings import UnsafeConfig, get_settings

    try:
        settings = get_settings()
    except (UnsafeConfig, ValueError) as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_json)
    settings.ensure_dirs()
    if migrate:
        run_migrations(settings)
    return settings


def _check_bind(settings, host: str) -> None:
    from common.auth import assert_auth_configured
    from common.db import session_scope
    from common.settings import UnsafeConfig

    try:
        with session_scope(settings) as session:
            assert_auth_configured(settings, session, host)
    except UnsafeConfig as exc:
        typer.echo(f"refusing to start: {exc}", err=True)
        raise typer.Exit(2) from None


def _uvicorn_config(settings, host: str, port: int):
    import uvicorn

    from api.main import create_app

    return uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
    )


class WorkerSupervisor:
    """Runs ``taq worker`` as a child process in its own session (so a terminal Ctrl-C reaches only
    us), restarts it if it dies, and stops it on shutdown: SIGTERM (the worker hands its running
    job back to the queue), then SIGKILL after a grace period."""

    def __init__(self, grace: float = 30.0, worker_class: str | None = None) -> None:
        self.grace = grace
        self.worker_class = worker_class
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "cli", "worker", "--skip-migrate", "--parent-pid", str(os.getpid())]
        if self.worker_class is not None:
            cmd += ["--class", self.worker_class]
        self.proc = subprocess.Popen(cmd, start_new_session=True, env=os.environ.copy())
        log.info("worker started", extra={"pid": self.proc.pid, "worker_class": self.worker_class})

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _watch(self) -> None:
        restarts = 0
        while not self._stopping.is_set():
            code = self.proc.poll() if self.proc else None
            if code is not None and not self._stopping.is_set():
                restarts += 1
                delay = min(30.0, 2.0 ** min(restarts, 5))
                log.error("worker exited; restarting", extra={"exit_code": code, "in_seconds": delay})
                if self._stopping.wait(delay):
                    return
                self._spawn()
            self._stopping.wait(1.0)

    def stop(self) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        log.info("stopping worker", extra={"pid": proc.pid})
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            log.warning("worker did not stop in time; killing it", extra={"pid": proc.pid})
            proc.kill()
            proc.wait(timeout=10)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="bind address; non-loopback needs API keys")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
) -> None:
    """Run the API and one worker per worker class (embedded default: SQLite, file:// storage,
    filesystem broker; one class unless TAQ_WORKER_CLASSES declares more)."""
    import uvicorn

    settings = _prepare(migrate=True)
    _check_bind(settings, host)
    declared = bool(settings.worker_classes.strip())
    supervisors = [WorkerSupervisor(worker_class=c.name if declared else None) for c in settings.fleet()]
    for supervisor in supervisors:
        supervisor.start()
    server = uvicorn.Server(_uvicorn_config(settings, host, port))
    log.info("serving", extra={"url": f"http://{host}:{port}", "data_dir": str(settings.data_dir)})
    try:
        server.run()  # returns (or re-raises the captured SIGINT) on Ctrl-C / SIGTERM
    except KeyboardInterrupt:
        pass
    finally:
        for supervisor in supervisors:
            supervisor.stop()
    log.info("stopped")


@app.command()
def api(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    skip_migrate: Annotated[bool, typer.Option("--skip-migrate", help="do not run migrations")] = False,
) -> None:
    """Run the HTTP API alone (production: next to `taq worker` processes)."""
    import uvicorn

    settings = _prepare(migrate=not skip_migrate)
    _check_bind(settings, host)
    if workers == 1:
        uvicorn.Server(_uvicorn_config(settings, host, port)).run()
    else:
        uvicorn.run(
            "api.main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_config=None,
            access_log=False,
            proxy_headers=True,
        )


def _watch_parent(parent_pid: int) -> None:
    def loop() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent_pid:
                log.warning("parent process is gone; stopping the worker")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)
                os._exit(1)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


@app.command()
def worker(
    skip_migrate: Annotated[bool, typer.Option("--skip-migrate", help="do not run migrations")] = False,
    worker_class: Annotated[
        str | None,
        typer.Option(
            "--class", help="the worker class (TAQ_WORKER_CLASSES) to serve; needed when several are declared"
        ),
    ] = None,
    parent_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
    loglevel: Annotated[str | None, typer.Option(help="overrides TAQ_LOG_LEVEL")] = None,
) -> None:
    """Run one Celery worker on its class's queue `quantize.<class>`: one job at a time, on the
    class's device (CUDA when available for the default class)."""
    import socket

    if worker_class is not None:
        os.environ["TAQ_WORKER_CLASS"] = worker_class  # read by get_settings() below and by the Celery app
    settings = _prepare(migrate=not skip_migrate)
    try:
        own_class = settings.own_worker_class()
    except ValueError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    if parent_pid is not None:
        _watch_parent(parent_pid)
    from worker.app import app as celery_app
    from worker.resources import tune_allocator

    tune_allocator()  # the jobs run in this process (--pool=solo)

    celery_app.worker_main(
        [
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            "-Q",
            own_class.queue,
            "--loglevel",
            (loglevel or settings.log_level).upper(),
            "--without-gossip",
            "--without-mingle",
            "--hostname",
            f"taq@{socket.gethostname()}-{os.getpid()}",
        ]
    )
