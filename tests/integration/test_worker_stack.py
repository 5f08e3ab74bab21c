"""(b)/(c) A real Celery worker process (`taq worker`) on Redis + PostgreSQL + S3 (moto server),
the API in-process: every method on the tiny Llama; cancel mid-run removes the partial files; a
worker killed mid-run is replaced and the job resumes after its stored stages, and one killed in
the middle of the layer pass resumes at the first layer without a checkpoint; either way the
artifacts are byte-identical to an uninterrupted run of the same spec."""

from __future__ import annotations

import hashlib
import signal

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from common.db import migrate
from common.settings import Settings
from common.storage import storage_from_settings

from .conftest import CALIBRATION, TAQ, Proc, make_bucket, service_env, tiny_spec, verify_artifacts, wait_for, wait_job

pytestmark = pytest.mark.integration

KEY = "stack-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: a job long enough to be caught mid-run: a budget sweep with both export formats
SWEEP = dict(bit_budget={"avg_bits": [5.0, 6.0, 7.0, 8.0, 8.5]}, exports=["gguf", "hf"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pg_database, redis_url, s3_endpoint, tiny_model_root):
    data = tmp_path_factory.mktemp("stack")
    bucket = make_bucket(s3_endpoint)
    config = dict(
        database_url=pg_database(),
        broker_url=redis_url,
        storage_url=f"s3://{bucket}/taq",
        s3_endpoint_url=s3_endpoint,
        model_roots=str(tiny_model_root),
        api_keys=f"team:{KEY}",
        heartbeat_seconds="1",
        stale_after_seconds="6",
        reaper_interval_seconds="2",
        requeue_queued_after_seconds="60",
        keep_work_files="true",
    )  # the resume test reads them
    settings = Settings(
        data_dir=data, **{k: v for k, v in config.items() if k != "model_roots"}, model_roots=[tiny_model_root]
    )
    migrate(settings)
    env = service_env(data_dir=str(data), **config)
    workers: list[Proc] = []

    def start_worker() -> Proc:
        proc = Proc([TAQ, "worker", "--skip-migrate"], env, data / f"worker-{len(workers)}.log")
        workers.append(proc)
        wait_for(
            lambda: proc.alive() and " ready." in proc.log_path.read_text(errors="replace"),
            120,
            what="celery worker ready",
        )
        return proc

    start_worker()
    with TestClient(create_app(settings)) as client:
        yield {
            "client": client,
            "settings": settings,
            "storage": storage_from_settings(settings),
            "start_worker": start_worker,
            "workers": workers,
            "env": env,
        }
    for proc in workers:
        proc.stop(signal.SIGTERM)


def test_every_method_succeeds(stack):
    client = stack["client"]
    specs = {
        "taq": tiny_spec("taq"),
        "taq_kl": tiny_spec("taq_kl"),
        "taqo": tiny_spec("taqo", allocation="paper", bit_budget=None),
        "uniform": tiny_spec("uniform", exports=["gguf"]),
    }
    jobs = {}
    for method, spec in specs.items():
        response = client.post("/v1/jobs", headers=AUTH, json=spec)
        assert response.status_code == 202, response.text
        jobs[method] = response.json()["id"]
    for method, job_id in jobs.items():
        final = wait_job(client, job_id, timeout=300, headers=AUTH)
        assert final["status"] == "succeeded", (method, final["error"])
        assert final["attempts"] == 1
        (budget,) = final["result"]["budgets"]
        if method != "taqo":
            assert budget["effective_bits"] <= 6.0 + 1e-9
        profile = client.get(f"/v1/jobs/{job_id}/profile", headers=AUTH).json()
        assert profile["method"] == method and len(profile["layers"]) == 4
        assert all(layer["bits"] in (4, 8, 16) for layer in profile["layers"])
        blobs = verify_artifacts(client, job_id, AUTH)
        assert ("model.gguf" in blobs) == ("gguf" in specs[method]["exports"])
        assert ("hf" in blobs) == ("hf" in specs[method]["exports"])
        stored = {o.key.split("/artifacts/", 1)[1] for o in stack["storage"].list(f"jobs/{job_id}/artifacts/")}
        assert set(blobs) - {"hf"} <= stored
    assert len(CALIBRATION) == 4


def _wait_stage(client, job_id: str, stages: set[str], timeout: float = 120) -> dict:
    def reached():
        job = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        assert job["status"] in ("queued", "running"), job
        return job if job["status"] == "running" and job["stage"] in stages else None

    return wait_for(reached, timeout, interval=0.05, what=f"stage in {stages}")


def test_cancel_mid_run_removes_partial_files(stack):
    client, storage = stack["client"], stack["storage"]
    job_id = client.post("/v1/jobs", headers=AUTH, json=tiny_spec("taq", **SWEEP)).json()["id"]
    _wait_stage(client, job_id, {"score", "allocate", "quantize", "export"})
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    final = wait_job(client, job_id, timeout=120, headers=AUTH)
    assert final["status"] == "cancelled" and final["finished_at"]
    assert storage.list(f"jobs/{job_id}/") == []
    assert client.get(f"/v1/jobs/{job_id}/artifacts", headers=AUTH).json() == []
    assert client.get(f"/v1/jobs/{job_id}/profile", headers=AUTH).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 409
    events = client.get(f"/v1/jobs/{job_id}/events", headers=AUTH).json()
    assert any(e["message"] == "cancel requested" for e in events)
    assert events[-1]["status"] == "cancelled"


@pytest.mark.timeout(600)
def test_killed_worker_is_replaced_and_the_job_resumes(stack):
    client, workers = stack["client"], stack["workers"]
    job_id = client.post("/v1/jobs", headers=AUTH, json=tiny_spec("taq", **SWEEP)).json()["id"]
    _wait_stage(client, job_id, {"quantize", "export"})
    workers[-1].stop(signal.SIGKILL)  # no chance to clean up: heartbeat goes stale
    stack["start_worker"]()  # its reaper requeues the job once the heartbeat is stale
    final = wait_job(client, job_id, timeout=300, headers=AUTH)
    assert final["status"] == "succeeded", final["error"]
    assert final["attempts"] == 2
    messages = [e["message"] or "" for e in client.get(f"/v1/jobs/{job_id}/events", headers=AUTH).json()]
    assert any("requeued" in m for m in messages)
    assert "score: skipped (profile.json stored)" in messages
    assert "allocate: skipped (bitmap.json stored)" in messages
    blobs = verify_artifacts(client, job_id, AUTH)
    assert {"hf-b5", "model-b8.5.gguf", "bitmap.json"} <= set(blobs)

    # the same spec run without interruption, on the same worker process (same torch thread
    # count: OMP_NUM_THREADS=1 from service_env), gives byte-identical artifacts
    assert stack["env"]["OMP_NUM_THREADS"] == "1"
    clean_id = client.post("/v1/jobs", headers=AUTH, json=tiny_spec("taq", **SWEEP)).json()["id"]
    clean = wait_job(client, clean_id, timeout=300, headers=AUTH)
    assert clean["status"] == "succeeded" and clean["attempts"] == 1, clean["error"]
    clean_blobs = verify_artifacts(client, clean_id, AUTH)
    digests = {name: hashlib.sha256(body).hexdigest() for name, body in blobs.items()}
    clean_digests = {name: hashlib.sha256(body).hexdigest() for name, body in clean_blobs.items()}
    assert digests == clean_digests
    listing = client.get(f"/v1/jobs/{job_id}/artifacts", headers=AUTH).json()
    assert listing == client.get(f"/v1/jobs/{clean_id}/artifacts", headers=AUTH).json()
    assert final["result"]["budgets"] == clean["result"]["budgets"]


@pytest.fixture(scope="module")
def wide_llama(tiny_model_root, smollm2_tokenizer_dir):
    """12 layers of width 384: with GPTQ at two widths each layer takes a noticeable fraction of a
    second on one thread, so a worker can be killed in the middle of the layer pass."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tiny_model_root / "wide-llama"
    if not (out / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=12,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(1)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return "wide-llama"


@pytest.mark.timeout(900)
def test_worker_killed_mid_layer_resumes_at_the_first_missing_layer(stack, wide_llama):
    client, workers, storage = stack["client"], stack["workers"], stack["storage"]
    spec = tiny_spec(
        "taq",
        model=wide_llama,
        quantizer="gptq",
        group_size=128,
        bit_choices=[4, 8, 16],
        bit_budget={"avg_bits": [5.0, 6.0]},
        exports=["gguf", "hf"],
    )
    job_id = client.post("/v1/jobs", headers=AUTH, json=spec).json()["id"]
    records = f"jobs/{job_id}/work/layers/"

    def stored_records() -> dict[str, object]:
        return {
            o.key: storage.client.head_object(Bucket=storage.bucket, Key=storage._k(o.key))["LastModified"]
            for o in storage.list(records)
            if o.key.endswith(".json")
        }

    wait_for(
        lambda: len([o for o in storage.list(records) if o.key.endswith(".json")]) >= 3,
        300,
        interval=0.02,
        what="three layer checkpoints",
    )
    workers[-1].stop(signal.SIGKILL)
    before = stored_records()
    assert 3 <= len(before) < 12, f"the worker was not killed mid-pass: {len(before)} of 12 layers stored"
    stack["start_worker"]()
    final = wait_job(client, job_id, timeout=600, headers=AUTH)
    assert final["status"] == "succeeded" and final["attempts"] == 2, final["error"]
    after = stored_records()
    assert len(after) == 12
    assert {k: after[k] for k in before} == before  # the checkpointed layers were not recomputed
    blobs = verify_artifacts(client, job_id, AUTH)

    clean_id = client.post("/v1/jobs", headers=AUTH, json=spec).json()["id"]
    clean = wait_job(client, clean_id, timeout=600, headers=AUTH)
    assert clean["status"] == "succeeded" and clean["attempts"] == 1, clean["error"]
    clean_blobs = verify_artifacts(client, clean_id, AUTH)
    assert {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()} == {
        n: hashlib.sha256(b).hexdigest() for n, b in clean_blobs.items()
    }
    assert final["result"]["budgets"] == clean["result"]["budgets"]


def test_sigterm_hands_the_running_job_back(stack):
    client, workers = stack["client"], stack["workers"]
    job_id = client.post("/v1/jobs", headers=AUTH, json=tiny_spec("uniform", **SWEEP)).json()["id"]
    _wait_stage(client, job_id, {"load", "calibrate", "score", "allocate", "quantize", "export"})
    assert workers[-1].stop(signal.SIGTERM, timeout=60) == 0  # warm shutdown
    job = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert job["status"] == "queued", job
    stack["start_worker"]()  # the job was re-sent on the way out: no reaper delay
    final = wait_job(client, job_id, timeout=300, headers=AUTH)
    assert final["status"] == "succeeded" and final["attempts"] == 2
    messages = [e["message"] or "" for e in client.get(f"/v1/jobs/{job_id}/events", headers=AUTH).json()]
    assert "retrying: worker stopped" in messages
