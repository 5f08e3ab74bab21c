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
    settings = Settings(
        data_dir=data,
        database_url=pg_database(),
        broker_url="filesystem://",
        storage_url=f"file://{data / 'objects'}",
        model_roots=[tiny_model_root],
        auth_cache_seconds=0,
        metrics_key=METRICS_KEY,
        max_queued_jobs_per_tenant=5,
    )
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
        envelope(client.get("/v1/models", headers={"Authorization": "Bearer anything-0123456789"}), 401, "unauthorized")
    keyless = settings.model_copy(update={"auth": "off"})
    with session_scope(settings) as session:
        assert_auth_configured(keyless, session, "127.0.0.1")
        with pytest.raises(UnsafeConfig, match="loopback only"):
            assert_auth_configured(keyless, session, "0.0.0.0")
        with pytest.raises(UnsafeConfig, match="TAQ_AUTH=off"):
            assert_auth_configured(keyless.model_copy(update={"env": "production"}), session)
    with pytest.raises(UnsafeConfig, match="TAQ_AUTH=off"):
        Settings(
            env="production", auth="off", database_url=settings.database_url, broker_url="redis://x:6379/0"
        ).check_production()


# ---- event streams ---------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_streams_hold_no_connection_and_are_capped_per_tenant(tmp_path, pg_database, tiny_model_root):
    database_url = pg_database()
    settings = Settings(data_dir=tmp_path, database_url=database_url, model_roots=[tiny_model_root])
    migrate(settings)
    tenants = [new_tenant(settings) for _ in range(5)]
    port = free_port()
    # a pool of 5 + 10 connections; 16 streams open at once would have exhausted it
    env = service_env(
        data_dir=str(tmp_path),
        database_url=database_url,
        model_roots=str(tiny_model_root),
        max_streams_per_tenant="4",
        sse_max_seconds="60",
        sse_poll_seconds="0.2",
    )
    api = Proc([TAQ, "api", "--port", str(port), "--skip-migrate"], env, tmp_path / "api.log")
    streams: list = []
    try:
        with http(f"http://127.0.0.1:{port}") as client:
            wait_for(lambda: _ready(client, api), 120, what="taq api")
            jobs = [client.post("/v1/jobs", headers=h, json=tiny_spec("uniform")).json()["id"] for h in tenants]
            stack = []
            for headers, job_id in zip(tenants[:4], jobs):
                for _ in range(4):
                    cm = client.stream(
                        "GET", f"/v1/jobs/{job_id}/events", headers={**headers, "Accept": "text/event-stream"}
                    )
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
            wait_for(
                lambda: client.get(f"/v1/jobs/{jobs[0]}/events?after=0", headers=tenants[0]).status_code == 200,
                10,
                what="events",
            )

            def reopened():
                with client.stream(
                    "GET", f"/v1/jobs/{jobs[0]}/events", headers={**tenants[0], "Accept": "text/event-stream"}
                ) as again:
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
    error = envelope(
        client.post("/v1/datasets", headers=auth, files={"file": ("x.jsonl", nested)}), 422, "invalid_dataset"
    )
    assert "nested deeper than" in error["message"]
    envelope(
        client.get("/v1/jobs/job_x/events", headers=auth, params={"after": "1" + "0" * 22}), 422, "validation_error"
    )
    envelope(client.get("/v1/jobs/job_x/events", headers={**auth, "Last-Event-ID": "9" * 30}), 422, "validation_error")
    envelope(client.get("/v1/jobs", headers=auth, params={"cursor": "W" * 5000}), 400, "invalid_request")
    envelope(
        client.post(
            "/v1/jobs", headers={**auth, "content-type": "application/json"}, content=b"[" * 100000 + b"]" * 100000
        ),
        400,
        "bad_request",
    )
    assert (
        client.post(
            "/v1/jobs",
            headers=auth,
            json={**tiny_spec("uniform"), "bit_budget": {"avg_bits": [4.5 + i for i in range(9)]}},
        ).status_code
        == 422
    )
    error = envelope(
        client.post("/v1/jobs", headers=auth, json=tiny_spec("uniform", model="broken-header")), 422, "model_invalid"
    )
    assert "broken-header.gguf" in error["message"]


def test_client_errors_name_no_server_path(hostile, base, tiny_model_root):
    client, auth = hostile
    error = envelope(
        client.post("/v1/jobs", headers=auth, json=tiny_spec("uniform", model="no-such-model")), 404, "model_not_found"
    )
    text = str(error)
    assert (
        str(tiny_model_root) not in text
        and str(base.data_dir) not in text
        and "/" not in error["message"].replace("/v1/models", "")
    )
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
            session.add(
                Artifact(
                    job_id=job_id,
                    name="bitmap.json",
                    format="json",
                    kind="file",
                    size=len(body),
                    sha256=hashlib.sha256(body).hexdigest(),
                    storage_key=key,
                )
            )
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


# ---- quotas and retention --------------------------------------------------------------------
def _upload(client, headers, text: str, name: str = "d.jsonl"):
    return client.post("/v1/datasets", headers=headers, files={"file": (name, text.encode())})


def test_datasets_are_listed_and_deleted_unless_in_use(base):
    storage = storage_from_settings(base)
    alice, bob = new_tenant(base), new_tenant(base)
    with TestClient(create_app(base), raise_server_exceptions=False) as client:
        ids = [_upload(client, alice, f'{{"prompt": "row {i}", "answers": ["x"]}}\n').json()["id"] for i in range(3)]
        first = client.get("/v1/datasets", headers=alice, params={"limit": 2}).json()
        second = client.get("/v1/datasets", headers=alice, params={"cursor": first["next_cursor"]}).json()
        assert [d["id"] for d in first["items"] + second["items"]] == ids[::-1] and second["next_cursor"] is None
        assert client.get("/v1/datasets", headers=bob).json() == {"items": [], "next_cursor": None}
        # a queued job reads ids[0]: it cannot be deleted
        spec = tiny_spec("taq", calibration=None, calibration_dataset_id=ids[0], seed=5)
        job_id = client.post("/v1/jobs", headers=alice, json=spec).json()["id"]
        error = envelope(client.delete(f"/v1/datasets/{ids[0]}", headers=alice), 409, "dataset_in_use")
        assert error["details"] == {"jobs": [job_id]}
        envelope(client.delete(f"/v1/datasets/{ids[1]}", headers=bob), 404, "dataset_not_found")
        # bob uploaded the same bytes as ids[1]: the stored file is shared until its last reference goes
        shared = _upload(client, bob, '{"prompt": "row 1", "answers": ["x"]}\n').json()
        key = f"datasets/{shared['sha256']}.jsonl"
        assert client.delete(f"/v1/datasets/{ids[1]}", headers=alice).status_code == 204
        assert storage.exists(key)
        assert client.delete(f"/v1/datasets/{shared['id']}", headers=bob).status_code == 204
        assert not storage.exists(key)
        assert [d["id"] for d in client.get("/v1/datasets", headers=alice).json()["items"]] == [ids[2], ids[0]]
        envelope(client.delete(f"/v1/datasets/{ids[1]}", headers=alice), 404, "dataset_not_found")


def test_finished_jobs_are_deleted_with_their_files(base):
    storage = storage_from_settings(base)
    headers = new_tenant(base)
    with TestClient(create_app(base), raise_server_exceptions=False) as client:
        job_id = client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform", seed=11)).json()["id"]
        envelope(client.delete(f"/v1/jobs/{job_id}", headers=headers), 409, "job_not_finished")
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 202
        storage.put_bytes(f"jobs/{job_id}/artifacts/leftover.json", b"{}")
        assert client.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 204
        envelope(client.get(f"/v1/jobs/{job_id}", headers=headers), 404, "job_not_found")
        assert storage.list(f"jobs/{job_id}/") == []


def test_per_tenant_quotas_name_their_setting(base):
    tight = base.model_copy(
        update={"max_datasets_per_tenant": 2, "max_jobs_per_tenant": 2, "max_stored_bytes_per_tenant": 200}
    )
    headers = new_tenant(base)
    with TestClient(create_app(tight), raise_server_exceptions=False) as client:
        assert _upload(client, headers, '{"prompt": "a"}\n').status_code == 201
        error = envelope(_upload(client, headers, '{"prompt": "' + "b" * 300 + '"}\n'), 413, "storage_quota")
        assert "TAQ_MAX_STORED_BYTES_PER_TENANT" in error["message"]
        assert _upload(client, headers, '{"prompt": "c"}\n').status_code == 201
        error = envelope(_upload(client, headers, '{"prompt": "d"}\n'), 429, "dataset_limit")
        assert "TAQ_MAX_DATASETS_PER_TENANT=2" in error["message"]
        # a job's disk estimate (every budget's export, the layer checkpoints) counts against the quota
        error = envelope(client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform")), 413, "storage_quota")
        assert error["details"]["adding"] > 200
    roomy = tight.model_copy(update={"max_stored_bytes_per_tenant": 1 << 40})
    with TestClient(create_app(roomy), raise_server_exceptions=False) as client:
        for seed in (1, 2):
            assert client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform", seed=seed)).status_code == 202
        error = envelope(client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform", seed=3)), 429, "job_limit")
        assert "TAQ_MAX_JOBS_PER_TENANT=2" in error["message"]


def test_the_retention_pass_removes_what_is_old_and_unused(base):
    from datetime import timedelta

    from common.orm import Dataset, utcnow
    from common.retention import retention_pass

    storage = storage_from_settings(base)
    headers = new_tenant(base)
    with TestClient(create_app(base), raise_server_exceptions=False) as client:
        old_ds = _upload(client, headers, '{"prompt": "old one"}\n').json()["id"]
        new_ds = _upload(client, headers, '{"prompt": "new one"}\n').json()["id"]
        old_job = client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform", seed=21)).json()["id"]
        new_job = client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform", seed=22)).json()["id"]
        for job_id in (old_job, new_job):
            client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    storage.put_bytes(f"jobs/{old_job}/artifacts/x.json", b"{}")
    with session_scope(base) as session:
        session.get(Job, old_job).finished_at = utcnow() - timedelta(days=10)
        session.get(Dataset, old_ds).created_at = utcnow() - timedelta(days=10)
    with session_scope(base) as session:
        assert retention_pass(session, base, storage).jobs == []  # TAQ_RETENTION_DAYS unset: nothing goes
        report = retention_pass(session, base.model_copy(update={"retention_days": 7}), storage)
    assert old_job in report.jobs and new_job not in report.jobs
    assert old_ds in report.datasets and new_ds not in report.datasets
    assert storage.list(f"jobs/{old_job}/") == []
    with session_scope(base) as session:
        assert session.get(Job, old_job) is None and session.get(Job, new_job) is not None


def test_the_rate_limit_answers_429_with_retry_after(base):
    limited = base.model_copy(update={"rate_limit_per_second": 0.5, "rate_limit_burst": 3})
    headers = new_tenant(base)
    with TestClient(create_app(limited), raise_server_exceptions=False) as client:
        assert [client.get("/v1/jobs", headers=headers).status_code for _ in range(3)] == [200, 200, 200]
        over = client.get("/v1/jobs", headers=headers)
        error = envelope(over, 429, "rate_limited")
        assert over.headers["retry-after"] == "2" and "TAQ_RATE_LIMIT_PER_SECOND" in error["message"]
        assert client.get("/v1/jobs", headers=new_tenant(base)).status_code == 200  # another key has its own bucket
