"""HTTP API against real PostgreSQL, a real (filesystem) broker with no consumer, and file://
storage: auth and tenant isolation, error envelopes, validation, idempotency, pagination,
cancel of queued jobs, events (JSON and SSE), readiness, metrics, OpenAPI."""

from __future__ import annotations

import json
import subprocess

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from common.db import migrate, session_scope
from common.orm import Job
from common.settings import Settings, UnsafeConfig

from .conftest import TAQ, new_tenant, service_env, tiny_spec

pytestmark = pytest.mark.integration

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef"
AUTH_A = {"Authorization": f"Bearer {ALICE}"}
AUTH_B = {"Authorization": f"Bearer {BOB}"}

EXPECTED_OPERATIONS = {
    "create_job",
    "list_jobs",
    "get_job",
    "cancel_job",
    "delete_job",
    "list_job_events",
    "get_job_profile",
    "list_job_artifacts",
    "download_job_artifact",
    "head_job_artifact",
    "upload_dataset",
    "list_datasets",
    "delete_dataset",
    "list_models",
    "list_workers",
    "healthz",
    "readyz",
    "metrics",
}


@pytest.fixture(scope="module")
def settings(tmp_path_factory, pg_database, tiny_model_root) -> Settings:
    data = tmp_path_factory.mktemp("api-data")
    settings = Settings(
        data_dir=data,
        database_url=pg_database(),
        broker_url="filesystem://",
        storage_url=f"file://{data / 'objects'}",
        model_roots=[tiny_model_root],
        api_keys=f"alice:{ALICE},bob:{BOB}",
        max_page_size=5,
        default_page_size=3,
        max_upload_bytes=4096,
        max_queued_jobs_per_tenant=8,
    )
    migrate(settings)
    return settings


@pytest.fixture(scope="module")
def client(settings) -> TestClient:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def assert_envelope(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details", "request_id"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]  # ties the reply to the logs
    assert "Traceback" not in response.text
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


# ---- auth ------------------------------------------------------------------------------------
def test_auth_is_required_when_keys_are_configured(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    err = assert_envelope(client.get("/v1/jobs"), 401, "unauthorized")
    assert "Bearer" in err["message"]
    assert client.get("/v1/jobs").headers["www-authenticate"].startswith("Bearer")
    assert_envelope(client.get("/v1/jobs", headers={"Authorization": "Bearer wrong-key-000000000000"}), 401)
    assert_envelope(client.get("/v1/jobs", headers={"Authorization": f"Basic {ALICE}"}), 401)
    assert client.get("/v1/jobs", headers=AUTH_A).status_code == 200


def test_db_managed_keys_are_hashed_and_work(client, settings):
    headers = new_tenant(settings)
    key = headers["Authorization"].split()[1]
    with session_scope(settings) as session:
        from common.orm import ApiKey

        stored = [row.key_hash for row in session.query(ApiKey).all()]
    assert key not in stored and all(len(h) == 64 for h in stored)
    assert client.get("/v1/jobs", headers=headers).json() == {"items": [], "next_cursor": None}


def test_tenant_isolation(client):
    ds = client.post("/v1/datasets", headers=AUTH_A, files={"file": ("c.jsonl", b'{"prompt": "hello"}\n')}).json()
    job = client.post(
        "/v1/jobs", headers=AUTH_A, json=tiny_spec("taq", calibration=None, calibration_dataset_id=ds["id"])
    ).json()
    assert job["status"] == "queued"
    for path in (
        f"/v1/jobs/{job['id']}",
        f"/v1/jobs/{job['id']}/events",
        f"/v1/jobs/{job['id']}/artifacts",
        f"/v1/jobs/{job['id']}/profile",
        f"/v1/jobs/{job['id']}/artifacts/manifest.json",
    ):
        assert_envelope(client.get(path, headers=AUTH_B), 404)
    assert_envelope(client.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH_B), 404, "job_not_found")
    assert job["id"] not in [j["id"] for j in client.get("/v1/jobs", headers=AUTH_B).json()["items"]]
    # bob cannot use alice's dataset either
    err = assert_envelope(
        client.post(
            "/v1/jobs", headers=AUTH_B, json=tiny_spec("taq", calibration=None, calibration_dataset_id=ds["id"])
        ),
        404,
        "dataset_not_found",
    )
    assert ds["id"] in err["message"]
    assert client.get(f"/v1/jobs/{job['id']}", headers=AUTH_A).status_code == 200


# ---- errors and validation ---------------------------------------------------------------------
def test_unknown_route_and_method_use_the_envelope(client):
    assert_envelope(client.get("/v2/nothing", headers=AUTH_A), 404, "not_found")
    assert_envelope(client.delete("/v1/jobs", headers=AUTH_A), 405, "method_not_allowed")
    assert_envelope(client.get("/v1/jobs/job_doesnotexist", headers=AUTH_A), 404, "job_not_found")


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ({"method": "uniform", "bit_budget": {"avg_bits": 4.5}}, "model"),
        (tiny_spec("taq", calibration=None), "calibration"),
        (tiny_spec("uniform", bit_choices=[9]), "bit_choices"),
        (tiny_spec("uniform", surprise=1), "surprise"),
        (tiny_spec("uniform", group_size=3), "group_size"),
        (tiny_spec("uniform", bit_budget={"avg_bits": 0.5}), "avg_bits"),
        (tiny_spec("uniform", allocation="paper"), "paper"),
    ],
)
def test_invalid_specs_are_422(client, spec, fragment):
    err = assert_envelope(client.post("/v1/jobs", headers=AUTH_A, json=spec), 422, "validation_error")
    assert fragment in json.dumps(err), err
    assert isinstance(err["details"], list) and err["details"][0]["loc"]


def test_malformed_json_is_422(client):
    assert_envelope(
        client.post("/v1/jobs", headers={**AUTH_A, "Content-Type": "application/json"}, content=b"{not json"),
        422,
        "validation_error",
    )


def test_unknown_or_unsafe_model(client):
    err = assert_envelope(
        client.post("/v1/jobs", headers=AUTH_A, json=tiny_spec("uniform", model="no-such-model")),
        404,
        "model_not_found",
    )
    assert "no-such-model" in err["message"]
    for bad in ("../tiny-llama", "/etc/passwd"):
        response = client.post("/v1/jobs", headers=AUTH_A, json=tiny_spec("uniform", model=bad))
        assert response.status_code in (404, 422), response.text
        assert_envelope(response, response.status_code)


def test_infeasible_budget_is_422(client):
    err = assert_envelope(
        client.post(
            "/v1/jobs", headers=AUTH_A, json=tiny_spec("uniform", bit_budget={"avg_bits": 3.0}, bit_choices=[4, 8])
        ),
        422,
        "budget_infeasible",
    )
    assert err["details"]["min_avg_bits"] == pytest.approx(4 + (16 + 8) / 32)  # fp16 scale + int8 zero per group


def test_reuse_profile_of_unfinished_job_is_rejected(client):
    first = client.post("/v1/jobs", headers=AUTH_A, json=tiny_spec("uniform")).json()
    assert_envelope(
        client.post(
            "/v1/jobs", headers=AUTH_A, json=tiny_spec("taq", calibration=None, profile_from_job_id=first["id"])
        ),
        422,
        "invalid_spec",
    )
    assert_envelope(
        client.post(
            "/v1/jobs", headers=AUTH_B, json=tiny_spec("taq", calibration=None, profile_from_job_id=first["id"])
        ),
        404,
        "job_not_found",
    )


def test_corrupt_row_gives_a_500_envelope_without_trace(client, settings):
    job = client.post("/v1/jobs", headers=AUTH_A, json=tiny_spec("uniform")).json()
    with session_scope(settings) as session:
        session.get(Job, job["id"]).spec = {"model": 42}
    err = assert_envelope(client.get(f"/v1/jobs/{job['id']}", headers=AUTH_A), 500, "internal_error")
    assert "42" not in err["message"]
    with session_scope(settings) as session:
        session.get(Job, job["id"]).spec = tiny_spec("uniform")


# ---- datasets --------------------------------------------------------------------------------
def test_dataset_upload_validates_every_line(client):
    good = b'{"prompt": "2+2?", "answers": ["4"]}\n{"messages": [{"role": "user", "content": "hi"}]}\n'
    first = client.post("/v1/datasets", headers=AUTH_A, files={"file": ("d.jsonl", good)})
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["rows"] == 2 and body["has_answers"] is True and len(body["sha256"]) == 64
    assert body["id"].startswith("ds_")
    again = client.post("/v1/datasets", headers=AUTH_A, files={"file": ("other-name.jsonl", good)}).json()
    assert again["id"] == body["id"]  # content-addressed
    other_tenant = client.post("/v1/datasets", headers=AUTH_B, files={"file": ("d.jsonl", good)}).json()
    assert other_tenant["id"] != body["id"] and other_tenant["sha256"] == body["sha256"]

    bad = b'{"prompt": "ok"}\nnot json\n{"prompt": "x", "extra": 1}\n'
    err = assert_envelope(
        client.post("/v1/datasets", headers=AUTH_A, files={"file": ("b.jsonl", bad)}), 422, "invalid_dataset"
    )
    lines = sorted(d["line"] for d in err["details"])
    assert lines == [2, 3] and all(d["reason"] for d in err["details"])
    assert_envelope(client.post("/v1/datasets", headers=AUTH_A, files={"file": ("e.jsonl", b"")}), 422)
    assert_envelope(
        client.post("/v1/datasets", headers=AUTH_A, files={"file": ("big.jsonl", b'{"prompt": "x"}\n' * 1000)}),
        413,
        "payload_too_large",
    )
    assert_envelope(client.post("/v1/datasets", headers=AUTH_A), 422, "validation_error")
    # a declared body far over the limit is refused before it is read
    huge = b'{"prompt": "x"}\n' * 100_000
    assert_envelope(
        client.post("/v1/datasets", headers=AUTH_A, files={"file": ("h.jsonl", huge)}), 413, "payload_too_large"
    )


# ---- idempotency -----------------------------------------------------------------------------
def test_idempotency_key(client, settings):
    headers = {**new_tenant(settings), "Idempotency-Key": "submit-1"}
    spec = tiny_spec("uniform")
    first = client.post("/v1/jobs", headers=headers, json=spec)
    assert first.status_code == 202
    replay = client.post("/v1/jobs", headers=headers, json=spec)
    assert replay.status_code == 202 and replay.json() == first.json()
    assert replay.headers.get("idempotent-replayed") == "true"
    listed = client.get("/v1/jobs", headers=headers).json()["items"]
    assert [j["id"] for j in listed] == [first.json()["id"]]
    err = assert_envelope(
        client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform", seed=7)), 409, "idempotency_conflict"
    )
    assert err["details"]["job_id"] == first.json()["id"]
    # keys are per tenant
    other = client.post("/v1/jobs", headers={**new_tenant(settings), "Idempotency-Key": "submit-1"}, json=spec)
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


# ---- listing ---------------------------------------------------------------------------------
def test_cursor_pagination_newest_first_with_status_filter(client, settings):
    headers = new_tenant(settings)
    ids = [client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform", seed=i)).json()["id"] for i in range(7)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=headers)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", headers=headers, params=params).json()
        assert len(page["items"]) <= 3
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == list(reversed(ids))
    default = client.get("/v1/jobs", headers=headers).json()
    assert len(default["items"]) == settings.default_page_size
    queued = client.get("/v1/jobs", headers=headers, params={"status": "queued", "limit": 5}).json()
    assert [j["id"] for j in queued["items"]] == list(reversed(ids[1:]))[:5] and queued["next_cursor"]
    cancelled = client.get("/v1/jobs", headers=headers, params=[("status", "cancelled"), ("status", "failed")]).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    assert_envelope(client.get("/v1/jobs", headers=headers, params={"limit": 6}), 422, "invalid_parameter")
    assert_envelope(client.get("/v1/jobs", headers=headers, params={"limit": 0}), 422, "validation_error")
    assert_envelope(client.get("/v1/jobs", headers=headers, params={"status": "weird"}), 422, "validation_error")
    assert_envelope(client.get("/v1/jobs", headers=headers, params={"cursor": "garbage!"}), 400, "invalid_request")


def test_queued_jobs_per_tenant_limit_is_429(client, settings):
    headers, other = new_tenant(settings), new_tenant(settings)
    ids = [
        client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform", seed=i)).json()["id"]
        for i in range(settings.max_queued_jobs_per_tenant)
    ]
    error = assert_envelope(
        client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform", seed=99)), 429, "queued_job_limit"
    )
    assert "TAQ_MAX_QUEUED_JOBS_PER_TENANT=8" in error["message"] and error["details"]["queued"] == 8
    # another tenant is not affected, and cancelling one frees a slot
    assert client.post("/v1/jobs", headers=other, json=tiny_spec("uniform")).status_code == 202
    assert client.post(f"/v1/jobs/{ids[0]}/cancel", headers=headers).status_code == 202
    assert client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform", seed=99)).status_code == 202


# ---- cancel, events --------------------------------------------------------------------------
def test_cancel_queued_job_and_events(client, settings):
    headers = new_tenant(settings)
    job = client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform")).json()
    assert job["status"] == "queued" and job["progress"] == 0.0 and job["spec"]["model"] == "tiny-llama"
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    err = assert_envelope(client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers), 409, "job_finished")
    assert err["details"]["status"] == "cancelled"

    events = client.get(f"/v1/jobs/{job['id']}/events", headers=headers).json()
    assert [e["status"] for e in events if e["kind"] == "status"] == ["queued", "cancelled"]
    assert (
        client.get(f"/v1/jobs/{job['id']}/events", headers=headers, params={"after": events[0]["id"]}).json()
        == events[1:]
    )
    with client.stream(
        "GET", f"/v1/jobs/{job['id']}/events", headers={**headers, "Accept": "text/event-stream"}
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    assert text.count("event: status") == 2 and "event: end" in text
    assert f"id: {events[-1]['id']}" in text
    with client.stream(
        "GET",
        f"/v1/jobs/{job['id']}/events",
        headers={**headers, "Accept": "text/event-stream", "Last-Event-ID": str(events[0]["id"])},
    ) as s:
        assert "".join(s.iter_text()).count("event: status") == 1
    assert_envelope(client.get(f"/v1/jobs/{job['id']}/profile", headers=headers), 404, "profile_not_ready")
    assert client.get(f"/v1/jobs/{job['id']}/artifacts", headers=headers).json() == []
    assert_envelope(client.get(f"/v1/jobs/{job['id']}/artifacts/hf", headers=headers), 404, "artifact_not_found")


# ---- ops -------------------------------------------------------------------------------------
def test_models_readyz_metrics_openapi(client, settings):
    models = client.get("/v1/models", headers=AUTH_A).json()
    assert "tiny-llama" in [m["id"] for m in models]
    assert all("path" not in m for m in models)
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and 'taq_jobs{status="queued"}' in metrics.text
    schema = client.get("/openapi.json").json()
    operations = {op["operationId"]: op for path in schema["paths"].values() for op in path.values()}
    assert set(operations) == EXPECTED_OPERATIONS
    assert all(op.get("tags") for op in operations.values())
    assert "JobSpec" in schema["components"]["schemas"]
    assert client.get("/v1/jobs", headers={**AUTH_A, "X-Request-ID": "abc123"}).headers["x-request-id"] == "abc123"


def test_readyz_reports_a_dead_broker(settings):
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        err = assert_envelope(client.get("/readyz"), 503, "not_ready")
    assert err["details"]["checks"]["database"] == "ok"
    assert err["details"]["checks"]["broker"].startswith("error")


def test_production_refuses_unsafe_configs(tmp_path, settings):
    with pytest.raises(UnsafeConfig, match="SQLite"):
        Settings(env="production", data_dir=tmp_path, broker_url="redis://x:6379/0").check_production()
    with pytest.raises(UnsafeConfig, match="filesystem"):
        create_app(Settings(env="production", data_dir=tmp_path, database_url=settings.database_url))
    Settings(
        env="production", data_dir=tmp_path, database_url=settings.database_url, broker_url="redis://x:6379/0"
    ).check_production()
    with pytest.raises(ValueError):
        Settings(api_keys="no-colon-here")
    # production without any key, and serving a public address with auth off, are refused
    from common.auth import assert_auth_configured

    keyless = settings.model_copy(update={"api_keys": ""})
    env = service_env(data_dir=str(tmp_path / "serve"))
    result = subprocess.run(
        [TAQ, "serve", "--host", "0.0.0.0", "--port", "1"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "refusing" in result.stderr
    fresh = Settings(data_dir=tmp_path / "fresh")
    migrate(fresh)
    with session_scope(fresh) as session:
        with pytest.raises(UnsafeConfig):
            assert_auth_configured(fresh.model_copy(update={"env": "production"}), session)
        assert_auth_configured(fresh, session, "127.0.0.1")
    assert keyless.api_keys == ""
