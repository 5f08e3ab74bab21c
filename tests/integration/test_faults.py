"""Fault injection against real processes:

* PostgreSQL outage: a real `taq api` process reaches PostgreSQL through a TCP proxy that the test
  cuts (every connection closed, new ones reset) and restores. During the outage every DB-backed
  call answers 503 `database_unavailable` (JSON envelope, `Retry-After`), `/readyz` 503 naming the
  database, `/healthz` 200; afterwards the same process answers normally again.
* Redis loses its data: jobs are queued while no worker runs, then the broker (a private
  `redis-server` without persistence) is killed and replaced by an empty one on the same port.
  The database is the source of truth: the worker's reaper re-sends the queued jobs the broker
  dropped, duplicate deliveries are skipped by the atomic claim, and every job succeeds once.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .conftest import TAQ, Proc, calibration_jsonl, free_port, http, service_env, tiny_spec, wait_for, wait_job

pytestmark = pytest.mark.integration

KEY = "faults-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


# ---- a TCP proxy that can be cut --------------------------------------------------------------
class CuttableProxy:
    """Forwards 127.0.0.1:<port> to ``target``. ``cut()`` closes every open connection and makes
    new ones fail at once (accepted, then reset); ``restore()`` forwards again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.closed = False
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.accepted = 0
        self.thread = threading.Thread(target=self._accept, name="pg-proxy", daemon=True)
        self.thread.start()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        # RST instead of FIN: the peer sees a dead connection, as after a crash
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        with contextlib.suppress(OSError):
            sock.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            if not self.up.is_set():
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._reset(client)
                continue
            with self.lock:
                self.sockets |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self.lock:
                self.sockets -= {src, dst}

    def open_connections(self) -> int:
        with self.lock:
            return len(self.sockets) // 2

    def cut(self) -> None:
        self.up.clear()
        with self.lock:
            victims, self.sockets = list(self.sockets), set()
        for sock in victims:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            self._reset(sock)

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


def _pg_target(url: str) -> tuple[str, int]:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


def _via(url: str, port: int) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def _assert_db_unavailable(response) -> None:
    assert response.status_code == 503, (response.request.method, response.request.url, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "database_unavailable", error
    assert response.headers["retry-after"] == "5"
    assert "Traceback" not in response.text


@pytest.mark.timeout(240)
def test_api_answers_503_during_a_database_outage_and_recovers(tmp_path, pg_database, tiny_model_root):
    from common.db import migrate
    from common.settings import Settings

    real_url = pg_database()
    data = tmp_path / "api"
    migrate(Settings(data_dir=data, database_url=real_url))
    proxy = CuttableProxy(_pg_target(real_url))
    port = free_port()
    env = service_env(
        data_dir=str(data),
        database_url=_via(real_url, proxy.port),
        model_roots=str(tiny_model_root),
        api_keys=f"team:{KEY}",
    )
    api = Proc([TAQ, "api", "--host", "127.0.0.1", "--port", str(port), "--skip-migrate"], env, tmp_path / "api.log")
    try:
        with http(f"http://127.0.0.1:{port}", AUTH) as client:

            def ready():
                assert api.alive(), api.tail()
                try:
                    return client.get("/readyz").status_code == 200
                except Exception:
                    return False

            wait_for(ready, 120, what="taq api /readyz")
            dataset = client.post("/v1/datasets", files={"file": ("cal.jsonl", calibration_jsonl(), "text/plain")})
            assert dataset.status_code == 201, dataset.text
            job = client.post("/v1/jobs", json=tiny_spec("taq"))
            assert job.status_code == 202, job.text
            job_id = job.json()["id"]
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
            assert proxy.open_connections() >= 1  # the API's pool holds live connections through the proxy

            proxy.cut()
            for _ in range(2):  # first with the dead pooled connections, then with fresh attempts
                started = time.monotonic()
                _assert_db_unavailable(client.get(f"/v1/jobs/{job_id}"))
                # fast: a refused connection is a 503 at once, never a wait for a pooled connection
                single = time.monotonic()
                _assert_db_unavailable(client.get(f"/v1/jobs/{job_id}"))
                assert time.monotonic() - single < 1.0
                _assert_db_unavailable(client.get("/v1/jobs"))
                assert client.get("/v1/models").status_code == 200  # env keys + model roots: no DB needed
                _assert_db_unavailable(client.post("/v1/jobs", json=tiny_spec("uniform")))
                _assert_db_unavailable(
                    client.post("/v1/datasets", files={"file": ("c.jsonl", calibration_jsonl(), "text/plain")})
                )
                _assert_db_unavailable(client.get(f"/v1/jobs/{job_id}/events"))
                ready = client.get("/readyz")
                assert ready.status_code == 503, ready.text
                body = ready.json()["error"]
                assert body["code"] == "not_ready" and body["details"]["checks"]["database"].startswith("error"), body
                assert body["details"]["checks"]["broker"] == "ok" and body["details"]["checks"]["storage"] == "ok"
                assert client.get("/healthz").status_code == 200
                assert time.monotonic() - started < 30  # answered, not hung
            assert api.alive()

            proxy.restore()
            # the same process, no restart: the very next request gets a fresh connection
            again = client.get(f"/v1/jobs/{job_id}")
            assert again.status_code == 200, again.text
            assert again.json()["id"] == job_id and again.json()["status"] == "queued"
            assert client.get("/readyz").status_code == 200
            listed = client.get("/v1/jobs")
            assert listed.status_code == 200 and [j["id"] for j in listed.json()["items"]] == [job_id]
            second = client.post("/v1/jobs", json=tiny_spec("uniform"))
            assert second.status_code == 202, second.text
            assert client.get("/v1/models").status_code == 200
            assert api.alive()  # the process that lived through the outage
        log = api.log_path.read_text(errors="replace")
        assert "database unavailable" in log and "Traceback" not in log
    finally:
        api.stop(signal.SIGTERM)
        proxy.close()


# ---- Redis loses everything -------------------------------------------------------------------
class RedisServer:
    """A private `redis-server` without persistence, so a restart comes back empty."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed by kill()
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server"),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--dir",
                str(self.log_path.parent),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        wait_for(lambda: self._ping(client), 20, interval=0.1, what="redis-server up")

    def _ping(self, client) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text(errors="replace")
        try:
            return bool(client.ping())
        except Exception:
            return False

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.mark.timeout(420)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_queued_jobs_survive_a_broker_that_lost_its_data(tmp_path, pg_database, tiny_model_root):
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from api.main import create_app
    from common.broker import class_queue, enqueue_job
    from common.db import migrate, session_scope
    from common.lifecycle import reap
    from common.orm import Job
    from common.settings import Settings
    from common.storage import storage_from_settings

    redis_port = free_port()
    server = RedisServer(redis_port, tmp_path / "redis.log")
    server.start()
    data = tmp_path / "data"
    config = dict(
        database_url=pg_database(),
        broker_url=f"redis://127.0.0.1:{redis_port}/0",
        storage_url=f"file://{data / 'objects'}",
        api_keys=f"team:{KEY}",
        heartbeat_seconds="1",
        stale_after_seconds="30",
        reaper_interval_seconds="1",
        requeue_queued_after_seconds="3",
    )
    settings = Settings(data_dir=data, model_roots=[tiny_model_root], **config)
    migrate(settings)
    queue = class_queue("default").name  # no TAQ_WORKER_CLASSES: the one class
    worker = None
    try:
        with TestClient(create_app(settings)) as client:
            # 1. no worker: three jobs wait in the broker
            before = [client.post("/v1/jobs", headers=AUTH, json=tiny_spec("uniform", seed=i)) for i in range(3)]
            assert [r.status_code for r in before] == [202] * 3, [r.text for r in before]
            job_ids = [r.json()["id"] for r in before]
            submitted = time.monotonic()
            assert server.client().llen(queue) == 3

            # 2. the broker loses everything: killed, and an empty one takes its port. A reaper
            # pass while it is down cannot re-send: the jobs stay due for the next pass
            server.kill()
            time.sleep(max(0.0, submitted + 3.5 - time.monotonic()))  # older than requeue_queued_after
            with session_scope(settings) as session:
                started = time.monotonic()
                report = reap(
                    session,
                    settings,
                    storage_from_settings(settings),
                    lambda job_id, worker_class: enqueue_job(settings, job_id, worker_class),
                )
                assert sorted(report.reenqueued) == sorted(job_ids) and time.monotonic() - started < 60
                assert set(session.scalars(select(Job.enqueued_at).where(Job.id.in_(job_ids)))) == {None}
            server.start()
            assert server.client().dbsize() == 0
            with session_scope(settings) as session:
                assert set(session.scalars(select(Job.status).where(Job.id.in_(job_ids)))) == {"queued"}

            # 3. the API's pooled broker connection recovers; one duplicate message on purpose
            after = client.post("/v1/jobs", headers=AUTH, json=tiny_spec("uniform", seed=3))
            assert after.status_code == 202, after.text
            job_ids.append(after.json()["id"])
            enqueue_job(settings, job_ids[0], "default")
            enqueue_job(settings, job_ids[0], "default")
            assert server.client().llen(queue) == 3

            # 4. a worker starts; its reaper re-sends what the broker dropped
            worker = Proc(
                [TAQ, "worker", "--skip-migrate"],
                service_env(data_dir=str(data), model_roots=str(tiny_model_root), **config),
                tmp_path / "worker.log",
            )
            finals = [wait_job(client, job_id, timeout=240, headers=AUTH) for job_id in job_ids]
            assert [f["status"] for f in finals] == ["succeeded"] * 4, [(f["id"], f["error"]) for f in finals]
            assert [f["attempts"] for f in finals] == [1] * 4  # each ran exactly once
            for job_id in job_ids:
                events = client.get(f"/v1/jobs/{job_id}/events", headers=AUTH).json()
                assert sum(1 for e in events if e["status"] == "running" and e["kind"] == "status") == 1
                assert events[-1]["status"] == "succeeded"
        log = worker.log_path.read_text(errors="replace")
        assert '"reenqueued"' in log and all(job_id in log for job_id in job_ids[:3])
        assert log.count("job not claimable") >= 2  # the duplicates were delivered and skipped
    finally:
        if worker is not None:
            worker.stop(signal.SIGTERM)
        server.kill()
