"""Real services for integration tests: a fresh PostgreSQL database per session, a private Redis
DB index, a moto S3 server, and helpers to run `taq serve` / `taq worker` as subprocesses.

Nothing of ours is mocked; moto stands in for S3 (it is a real HTTP server speaking the S3 API).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

PG_ADMIN_DSN = os.environ.get("TAQ_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_URL_TEMPLATE = os.environ.get("TAQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/{db}")
REDIS_HOST = os.environ.get("TAQ_TEST_REDIS", "redis://127.0.0.1:6379")
TAQ = str(Path(sys.executable).with_name("taq"))

# tiny workloads: 4 calibration prompts, 32 tokens
CALIBRATION = [
    {"prompt": "What is the capital of France?", "answers": ["Paris"]},
    {"prompt": "What is the capital of Japan?", "answers": ["Tokyo"]},
    {"prompt": "What is the capital of Italy?", "answers": ["Rome"]},
    {"prompt": "What is the capital of Spain?", "answers": ["Madrid"]},
]


def tiny_spec(method: str = "uniform", **overrides) -> dict:
    spec = {
        "model": "tiny-llama",
        "method": method,
        "bit_budget": {"avg_bits": 6.0},
        "bit_choices": [4, 8],
        "group_size": 32,
        "exports": ["hf"],
        "max_tokens": 32,
        "max_calibration_rows": 8,
        "reservoir_size": 16,
        "seed": 0,
    }
    if method != "uniform":
        spec["calibration"] = CALIBRATION
    spec.update(overrides)
    return spec


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def wait_job(client, job_id: str, timeout: float = 240, headers: dict | None = None) -> dict:
    def done():
        job = client.get(f"/v1/jobs/{job_id}", headers=headers or {}).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout, what=f"job {job_id} to finish")


def service_missing(reason: str) -> NoReturn:
    """PostgreSQL or Redis is not there: the tests that need it skip with the reason, except under
    CI=true, where they fail (CI runs them against real services; a skip would pass silently)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the integration tests must run against it)", pytrace=False)
    pytest.skip(reason)


# ---- PostgreSQL ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_database() -> Iterator:
    """Factory: a fresh database ``taq_test_<random>`` per call, all dropped at session end."""
    try:
        import psycopg
    except ImportError as exc:
        service_missing(f"psycopg is not installed ({exc})")
    try:
        psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        service_missing(f"PostgreSQL not reachable at {PG_ADMIN_DSN!r}: {exc}")
    created: list[str] = []

    def create() -> str:
        name = f"taq_test_{secrets.token_hex(6)}"
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return PG_URL_TEMPLATE.format(db=name)

    try:
        yield create
    finally:
        from common.db import dispose_engines

        dispose_engines()
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            for name in created:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---- Redis -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    try:
        import redis
    except ImportError as exc:
        service_missing(f"redis (the client) is not installed ({exc})")
    for index in list(range(15, 1, -1)):
        client = redis.Redis.from_url(f"{REDIS_HOST}/{index}")
        try:
            if client.dbsize() == 0 and client.set("taq-test-lock", "1", nx=True, ex=3600):
                break
        except redis.ConnectionError as exc:
            service_missing(f"Redis not reachable at {REDIS_HOST}: {exc}")
    else:
        service_missing(f"no empty Redis database index available at {REDIS_HOST} (2..15 are all in use)")
    try:
        yield f"{REDIS_HOST}/{index}"
    finally:
        client.flushdb()


# ---- S3 (moto) -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"taq-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


# ---- processes -------------------------------------------------------------------------------
class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()
        return self.proc.returncode


def service_env(**taq: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAQ_")}
    env.update(
        {
            "TAQ_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    env.update({f"TAQ_{k.upper()}": v for k, v in taq.items()})
    return env


@contextmanager
def serve_embedded(data: Path, model_root: Path, **taq: str) -> Iterator[dict]:
    """`taq serve` as a subprocess on a free loopback port with ``TAQ_DATA_DIR=data``,
    ``TAQ_MODEL_ROOTS=model_root`` and any other ``TAQ_*`` given as keywords (``storage_url=…``);
    yields {"client": httpx client on it (no auth header), "proc", "data", "env"} once /readyz is
    200, and stops it with Ctrl-C (SIGINT) afterwards."""
    port = free_port()
    env = service_env(data_dir=str(data), model_roots=str(model_root), **taq)
    proc = Proc([TAQ, "serve", "--host", "127.0.0.1", "--port", str(port)], env, data / "serve.log")
    try:
        with http(f"http://127.0.0.1:{port}") as client:

            def ready():
                assert proc.alive(), proc.tail()
                try:
                    return client.get("/readyz").status_code == 200
                except Exception:
                    return False

            wait_for(ready, 180, what="taq serve /readyz")
            yield {"client": client, "proc": proc, "data": data, "env": env}
    finally:
        proc.stop(signal.SIGINT)


def dump_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def http(base_url: str, headers: dict | None = None) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=60, headers=headers or {})


def new_tenant(settings) -> dict[str, str]:
    """Auth headers of a fresh tenant with a DB-managed key."""
    from common.auth import create_key
    from common.db import session_scope

    with session_scope(settings) as session:
        created = create_key(session, f"t-{secrets.token_hex(4)}")
    return {"Authorization": f"Bearer {created.key}"}


def calibration_jsonl(rows=CALIBRATION) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def verify_artifacts(client, job_id: str, headers: dict | None = None) -> dict[str, bytes]:
    """Download every listed artifact (and every file of a directory artifact) and check size and
    sha256 against the listing; a directory's .tar must unpack to exactly its files."""
    import hashlib
    import io
    import tarfile

    headers = headers or {}
    listing = client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json()
    assert listing, "no artifacts"
    blobs: dict[str, bytes] = {}
    for art in listing:
        response = client.get(f"/v1/jobs/{job_id}/artifacts/{art['name']}", headers=headers)
        assert response.status_code == 200, (art["name"], response.text[:300])
        body = response.content
        assert len(body) == art["size"], art["name"]
        assert hashlib.sha256(body).hexdigest() == art["sha256"], art["name"]
        assert response.headers["etag"] == f'"{art["sha256"]}"'
        blobs[art["name"]] = body
        if art["kind"] == "directory":
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
            assert sorted(members) == sorted(f["name"] for f in art["files"])
            for entry in art["files"]:
                single = client.get(f"/v1/jobs/{job_id}/artifacts/{entry['name']}", headers=headers)
                assert single.status_code == 200, entry["name"]
                assert (
                    hashlib.sha256(single.content).hexdigest()
                    == entry["sha256"]
                    == hashlib.sha256(members[entry["name"]]).hexdigest()
                )
                blobs[entry["name"]] = single.content
    return blobs
