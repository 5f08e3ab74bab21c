"""Admission limits over HTTP against real PostgreSQL: the memory preflight (422 job_too_large),
rows per dataset and per-prompt size (422 with the line), request body size for bodies without
a declared length (413), and ``Idempotency-Key`` on dataset uploads."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from common.db import migrate
from common.settings import Settings
from core.memory import estimate_job_memory
from core.model_dims import ModelDims

from .conftest import CALIBRATION, new_tenant, tiny_spec

pytestmark = pytest.mark.integration

ALICE = "alice-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ALICE}"}
GOOD = b'{"prompt": "2+2?", "answers": ["4"]}\n{"messages": [{"role": "user", "content": "hi"}]}\n'


@pytest.fixture(scope="module")
def settings(tmp_path_factory, pg_database, tiny_model_root) -> Settings:
    data = tmp_path_factory.mktemp("limits-data")
    settings = Settings(
        data_dir=data,
        database_url=pg_database(),
        broker_url="filesystem://",
        storage_url=f"file://{data / 'objects'}",
        model_roots=[tiny_model_root],
        api_keys=f"alice:{ALICE}",
        max_upload_bytes=64 * 1024,
        max_prompt_tokens=64,
        max_dataset_rows=3,
        max_request_bytes=4096,
    )
    migrate(settings)
    return settings


@pytest.fixture(scope="module")
def client(settings) -> TestClient:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def assert_envelope(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]


# ---- memory preflight ------------------------------------------------------------------------
def test_job_over_the_worker_memory_is_422_naming_estimate_and_limit(settings, tiny_llama_dir):
    small = settings.model_copy(update={"worker_memory_bytes": 64 * 1024 * 1024})
    spec = tiny_spec("taq")
    with TestClient(create_app(small), raise_server_exceptions=False) as client:
        err = assert_envelope(client.post("/v1/jobs", headers=AUTH, json=spec), 422, "job_too_large")
        listed = client.get("/v1/jobs", headers=AUTH).json()["items"]
    dims = ModelDims.from_config(json.loads((tiny_llama_dir / "config.json").read_text()))
    expected = estimate_job_memory(dims, method="taq", calibration_rows=len(CALIBRATION), max_tokens=spec["max_tokens"])
    details = err["details"]
    assert details["estimate_bytes"] == expected.total_bytes > details["limit_bytes"] == 64 * 1024 * 1024
    assert details["breakdown"] == expected.breakdown and details["limit_source"] == "TAQ_WORKER_MEMORY_BYTES"
    assert f"about {expected.total_bytes / 2**30:.2f} GiB" in err["message"]
    assert "the limit is 0.06 GiB (TAQ_WORKER_MEMORY_BYTES)" in err["message"]
    assert "raise TAQ_WORKER_MEMORY_BYTES" in err["message"]
    assert listed == []  # nothing was queued
    # the default limit is this machine's RAM: the same tiny job is accepted
    assert settings.worker_memory_bytes is None and settings.worker_memory_limit()[0] > expected.total_bytes
    # (the shared client has 4 KiB request bodies; the spec fits)
    accepted = TestClient(create_app(settings), raise_server_exceptions=False)
    with accepted:
        assert accepted.post("/v1/jobs", headers=new_tenant(settings), json=spec).status_code == 202


# ---- dataset rows and prompt size ------------------------------------------------------------
def test_too_many_rows_is_422_naming_the_limit(client):
    rows = b'{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c"}\n{"prompt": "d"}\n'
    err = assert_envelope(
        client.post("/v1/datasets", headers=AUTH, files={"file": ("r.jsonl", rows)}), 422, "too_many_rows"
    )
    assert err["details"] == {"rows": 4, "limit": 3}
    assert "4 rows; the limit is 3 (TAQ_MAX_DATASET_ROWS)" in err["message"]


def test_prompt_over_the_limit_is_422_with_its_line(client):
    long_prompt = "x" * 65
    data = (
        b'{"prompt": "ok"}\n\n'
        + json.dumps({"prompt": long_prompt}).encode()
        + b"\n"
        + json.dumps({"prompt": "fine", "answers": ["é" * 40]}).encode()
        + b"\n"
    )  # 40 chars, 80 bytes
    err = assert_envelope(
        client.post("/v1/datasets", headers=AUTH, files={"file": ("p.jsonl", data)}), 422, "prompt_too_long"
    )
    assert err["details"] == [
        {"line": 3, "field": "prompt", "bytes": 65, "limit": 64},
        {"line": 4, "field": "answers[0]", "bytes": 80, "limit": 64},
    ]
    assert err["message"].startswith("2 prompts over the limit; line 3: prompt is 65 UTF-8 bytes")
    assert "TAQ_MAX_PROMPT_TOKENS=64" in err["message"]
    # exactly at the limit is accepted; chat messages count their roles and contents
    at_limit = json.dumps({"prompt": "x" * 64}).encode() + b"\n"
    assert client.post("/v1/datasets", headers=AUTH, files={"file": ("ok.jsonl", at_limit)}).status_code == 201
    chat = json.dumps(
        {"messages": [{"role": "user", "content": "y" * 30}, {"role": "assistant", "content": "z" * 30}]}
    ).encode()
    err = assert_envelope(
        client.post("/v1/datasets", headers=AUTH, files={"file": ("c.jsonl", chat)}), 422, "prompt_too_long"
    )
    assert err["details"] == [{"line": 1, "field": "messages", "bytes": 73, "limit": 64}]


def test_inline_calibration_prompt_over_the_limit_is_422(client):
    rows = [{"prompt": "short"}, {"prompt": "w" * 100}]
    err = assert_envelope(
        client.post("/v1/jobs", headers=AUTH, json=tiny_spec("taq", calibration=rows)), 422, "prompt_too_long"
    )
    assert err["details"] == [{"calibration_row": 2, "field": "prompt", "bytes": 100, "limit": 64}]


def test_request_body_without_length_over_the_limit_is_413(client):
    spec = json.dumps(tiny_spec("taq", calibration=[{"prompt": "p" * 60}] * 60)).encode()
    assert len(spec) > 4096

    def chunks():
        for i in range(0, len(spec), 512):
            yield spec[i : i + 512]

    response = client.post("/v1/jobs", headers={**AUTH, "Content-Type": "application/json"}, content=chunks())
    assert "content-length" not in {k.lower() for k in response.request.headers}
    err = assert_envelope(response, 413, "payload_too_large")
    assert err["message"] == "request body larger than 4096 bytes (TAQ_MAX_REQUEST_BYTES)"
    declared = client.post("/v1/jobs", headers={**AUTH, "Content-Type": "application/json"}, content=spec)
    assert_envelope(declared, 413, "payload_too_large")


# ---- Idempotency-Key on uploads --------------------------------------------------------------
def test_dataset_upload_idempotency_key(client, settings):
    tenant = new_tenant(settings)
    headers = {**tenant, "Idempotency-Key": "upload-1"}
    first = client.post("/v1/datasets", headers=headers, files={"file": ("d.jsonl", GOOD)})
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    replay = client.post("/v1/datasets", headers=headers, files={"file": ("d.jsonl", GOOD)})
    assert replay.status_code == 201 and replay.json() == first.json()
    assert replay.headers.get("idempotent-replayed") == "true"
    # another file, or the same bytes under another name, with the same key: 409
    other = GOOD + b'{"prompt": "3+3?"}\n'
    err = assert_envelope(
        client.post("/v1/datasets", headers=headers, files={"file": ("d.jsonl", other)}), 409, "idempotency_conflict"
    )
    assert err["details"] == {"dataset_id": first.json()["id"]}
    assert_envelope(
        client.post("/v1/datasets", headers=headers, files={"file": ("e.jsonl", GOOD)}), 409, "idempotency_conflict"
    )
    # a key already used for a job is a conflict here too (one key space per tenant)
    job = client.post("/v1/jobs", headers={**tenant, "Idempotency-Key": "job-1"}, json=tiny_spec("uniform"))
    assert job.status_code == 202, job.text
    err = assert_envelope(
        client.post("/v1/datasets", headers={**tenant, "Idempotency-Key": "job-1"}, files={"file": ("d.jsonl", GOOD)}),
        409,
        "idempotency_conflict",
    )
    assert err["details"] == {"job_id": job.json()["id"]}
    # keys are per tenant; an invalid upload stores no key (a corrected retry may reuse it)
    elsewhere = client.post(
        "/v1/datasets",
        headers={**new_tenant(settings), "Idempotency-Key": "upload-1"},
        files={"file": ("d.jsonl", GOOD)},
    )
    assert elsewhere.status_code == 201 and elsewhere.json()["id"] != first.json()["id"]
    retry = {**tenant, "Idempotency-Key": "upload-2"}
    assert_envelope(
        client.post("/v1/datasets", headers=retry, files={"file": ("b.jsonl", b"not json\n")}), 422, "invalid_dataset"
    )
    fixed = client.post("/v1/datasets", headers=retry, files={"file": ("b.jsonl", other)})
    assert fixed.status_code == 201 and "idempotent-replayed" not in fixed.headers
    assert_envelope(
        client.post(
            "/v1/datasets", headers={**tenant, "Idempotency-Key": "k" * 256}, files={"file": ("d.jsonl", GOOD)}
        ),
        400,
        "invalid_request",
    )
