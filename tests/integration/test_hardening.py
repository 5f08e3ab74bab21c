"""Hardening on PostgreSQL: auth fails closed, event streams hold no database connection and are
capped per tenant, hostile input gets a 4xx, client errors carry no server path but the request id,
the queued-job quota holds under concurrent submits, HEAD on artifacts, a read-only /readyz and a
key-protected /metrics."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import signal
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from common.auth import assert_auth_configured, create_key, revoke_key
from common.db import migrate, session_scope
from common.orm import Artifact, Job
from common.settings import Settings, UnsafeConfig
from common.storage import storage_from_settings

from .conftest import TAQ, Proc, free_port, http, new_tenant, service_env, tiny_spec, wait_for

pytestmark = pytest.mark.integration

METRICS_KEY = "metrics-key-0123456789abcdef"


@pytest.fixture(scope="module")
def base(tmp_path_factory, pg_database, tiny_model_root) -> Settings:
    data = tmp_path_factory.mktemp("hardening")
    settings = Settings(data_dir=data, database_url=pg_database(), broker_url="filesystem://",
                        storage_url=f"file://{data / 'objects'}", model_roots=[tiny_model_root],
                        auth_cache_seconds=0, metrics_key=METRICS_KEY, max_queued_jobs_per_tenant=5)
    migrate(settings)
    return settings


def envelope(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["request_id"] == response.headers["x-request-id"]
    return error


# ---- auth fails closed -----------------------------------------------------------------------
def test_revoking_the_last_database_key_leaves_the_api_refusing(base):
    with session_scope(base) as session:
        created = create_key(session, "solo")
    headers = {"Authorization": f"Bearer {created.key}"}
    with TestClient(create_app(base), raise_server_exceptions=False) as client:
        assert client.get("/v1/jobs", headers=headers).status_code == 200
        with session_scope(base) as session:
            revoke_key(session, created.id)
        envelope(client.get("/v1/jobs"), 401, "unauthorized")
        envelope(client.get("/v1/jobs", headers=headers), 401, "unauthorized")
        envelope(client.post("/v1/jobs", json=tiny_spec("uniform")), 401, "unauthorized")
    # a restarted API too: a deployment that has had keys keeps needing them
    with TestClient(create_app(base), raise_server_exceptions=False) as client:
        envelope(client.get("/v1/jobs"), 401, "unauthorized")


def test_auth_required_refuses_everything_even_without_keys(tmp_path, pg_database):
    settings = Settings(data_dir=tmp_path, database_url=pg_database(), auth="required")
    migrate(settings)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        envelope(client.get("/v1/jobs"), 401, "unauthorized")
        envelope(client.get("/v1/models", headers={"Authorization": "Bearer anything-0123456789"}), 401,
                 "unauthorized")
    keyless = settings.model_copy(update={"auth": "off"})
    with session_scope(settings) as session:
        assert_auth_configured(keyless, session, "127.0.0.1")
        with pytest.raises(UnsafeConfig, match="loopback only"):
            assert_auth_configured(keyless, session, "0.0.0.0")
        with pytest.raises(UnsafeConfig, match="TAQ_AUTH=off"):
            assert_auth_configured(keyless.model_copy(update={"env": "production"}), session)
    with pytest.raises(UnsafeConfig, match="TAQ_AUTH=off"):
        Settings(env="production", auth="off", database_url=settings.database_url,
                 broker_url="redis://x:6379/0").check_production()


# ---- event streams ---------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_streams_hold_no_connection_and_are_capped_per_tenant(tmp_path, pg_database, tiny_model_root):
    database_url = pg_database()
    settings = Settings(data_dir=tmp_path, database_url=database_url, model_roots=[tiny_model_root])
    migrate(settings)
    tenants = [new_tenant(settings) for _ in range(5)]
    port = free_port()
    # a pool of 5 + 10 connections; 16 streams open at once would have exhausted it
    env = service_env(data_dir=str(tmp_path), database_url=database_url, model_roots=str(tiny_model_root),
                      max_streams_per_tenant="4", sse_max_seconds="60", sse_poll_seconds="0.2")
    api = Proc([TAQ, "api", "--port", str(port), "--skip-migrate"], env, tmp_path / "api.log")
    streams: list = []
    try:
        with http(f"http://127.0.0.1:{port}") as client:
            wait_for(lambda: _ready(client, api), 120, what="taq api")
            jobs = [client.post("/v1/jobs", headers=h, json=tiny_spec("uniform")).json()["id"] for h in tenants]
            stack = []
            for headers, job_id in zip(tenants[:4], jobs):
                for _ in range(4):
                    cm = client.stream("GET", f"/v1/jobs/{job_id}/events",
                                       headers={**headers, "Accept": "text/event-stream"})
                    response = cm.__enter__()
                    assert response.status_code == 200
                    lines = response.iter_lines()  # kept: a dropped line iterator closes the response
                    assert next(lines) == "retry: 2000"  # the stream is open and polling
                    stack.append((cm, lines))
            streams = stack
            over = client.get(f"/v1/jobs/{jobs[0]}/events", headers={**tenants[0], "Accept": "text/event-stream"})
            error = envelope(over, 429, "too_many_streams")
            assert over.headers["retry-after"] == "5" and "TAQ_MAX_STREAMS_PER_TENANT=4" in error["message"]
            started = time.monotonic()
            listed = client.get("/v1/jobs", headers=tenants[4])
            assert listed.status_code == 200 and time.monotonic() - started < 2.0
            assert client.get(f"/v1/jobs/{jobs[4]}", headers=tenants[4]).status_code == 200
            for cm, _ in streams:  # closing frees the slots
                cm.__exit__(None, None, None)
            streams = []
            wait_for(lambda: client.get(f"/v1/jobs/{jobs[0]}/events?after=0", headers=tenants[0]).status_code == 200,
                     10, what="events")
            def reopened():
                with client.stream("GET", f"/v1/jobs/{jobs[0]}/events",
                                   headers={**tenants[0], "Accept": "text/event-stream"}) as again:
                    return again.status_code == 200
            wait_for(reopened, 30, interval=0.5, what="a stream slot freed after disconnects")
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
        api.stop(signal.SIGTERM)


def _ready(client, proc) -> bool:
    assert proc.alive(), proc.tail()
    try:
        return client.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


# ---- hostile input ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile(base, tiny_model_root):
    broken = tiny_model_root / "broken-header.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(60))
    settings = base.model_copy(update={"api_keys": "eve:eve-key-0123456789abcdef"})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, {"Authorization": "Bearer eve-key-0123456789abcdef"}
    broken.unlink()


def test_hostile_input_gets_4xx(hostile):
    client, auth = hostile
    nested = b"[" * 3000 + b"]" * 3000 + b"\n"
    error = envelope(client.post("/v1/datasets", headers=auth, files={"file": ("x.jsonl", nested)}), 422,
                     "invalid_dataset")
    assert "nested deeper than" in error["message"]
    envelope(client.get("/v1/jobs/job_x/events", headers=auth, params={"after": "1" + "0" * 22}), 422,
             "validation_error")
    envelope(client.get("/v1/jobs/job_x/events", headers={**auth, "Last-Event-ID": "9" * 30}), 422,
             "validation_error")
    envelope(client.get("/v1/jobs", headers=auth, params={"cursor": "W" * 5000}), 400, "invalid_request")
    envelope(client.post("/v1/jobs", headers={**auth, "content-type": "application/json"},
                         content=b"[" * 100000 + b"]" * 100000), 400, "bad_request")
    assert client.post("/v1/jobs", headers=auth, json={**tiny_spec("uniform"), "bit_budget": {
        "avg_bits": [4.5 + i for i in range(9)]}}).status_code == 422
    error = envelope(client.post("/v1/jobs", headers=auth, json=tiny_spec("uniform", model="broken-header")), 422,
                     "model_invalid")
    assert "broken-header.gguf" in error["message"]


def test_client_errors_name_no_server_path(hostile, base, tiny_model_root):
    client, auth = hostile
    error = envelope(client.post("/v1/jobs", headers=auth, json=tiny_spec("uniform", model="no-such-model")), 404,
                     "model_not_found")
    text = str(error)
    assert str(tiny_model_root) not in text and str(base.data_dir) not in text and "/" not in error["message"].replace(
        "/v1/models", "")
    assert error["details"] == {"model": "no-such-model"}


# ---- quotas, artifacts, ops ------------------------------------------------------------------
def test_the_queued_job_quota_holds_under_concurrent_submits(base):
    headers = new_tenant(base)
    with TestClient(create_app(base), raise_server_exceptions=False) as client:
        def submit(seed: int) -> int:
            return client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform", seed=seed)).status_code
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            codes = list(pool.map(submit, range(40)))
        queued = client.get("/v1/jobs", headers=headers, params={"status": "queued", "limit": 100}).json()["items"]
    assert sorted(set(codes)) == [202, 429] and codes.count(202) == 5
    assert len(queued) == 5


def test_head_on_an_artifact_gives_the_headers_without_the_body(base):
    headers = new_tenant(base)
    storage = storage_from_settings(base)
    body = b"artifact bytes " * 100
    with TestClient(create_app(base), raise_server_exceptions=False) as client:
        job_id = client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform", seed=99)).json()["id"]
        key = f"jobs/{job_id}/artifacts/bitmap.json"
        storage.put_bytes(key, body)
        with session_scope(base) as session:
            session.add(Artifact(job_id=job_id, name="bitmap.json", format="json", kind="file", size=len(body),
                                 sha256=hashlib.sha256(body).hexdigest(), storage_key=key))
            session.get(Job, job_id).status = "succeeded"
        head = client.head(f"/v1/jobs/{job_id}/artifacts/bitmap.json", headers=headers)
        get = client.get(f"/v1/jobs/{job_id}/artifacts/bitmap.json", headers=headers)
        missing = client.head(f"/v1/jobs/{job_id}/artifacts/none.json", headers=headers)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(body)) == get.headers["content-length"]
    assert head.headers["etag"] == get.headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    assert get.content == body and missing.status_code == 404


def test_readyz_writes_nothing_and_metrics_need_their_key(base):
    root = base.data_dir / "objects"
    before = sorted(p.name for p in root.rglob("*"))
    with TestClient(create_app(base), raise_server_exceptions=False) as client:
        for _ in range(3):
            assert client.get("/readyz").status_code == 200
        assert sorted(p.name for p in root.rglob("*")) == before
        envelope(client.get("/metrics"), 401, "unauthorized")
        envelope(client.get("/metrics", headers={"Authorization": "Bearer wrong-key-0123456789"}), 401, "unauthorized")
        scraped = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert scraped.status_code == 200 and "taq_jobs" in scraped.text
