"""Worker classes on the real stack (PostgreSQL, Redis, `taq worker --class` processes): a job goes
to the smallest class whose memory holds it and waits in that class's queue until a worker of the
class runs; pinning a class too small is a 422; a SIGKILLed worker is replaced by another of its
class and the job finishes; GET /v1/workers and /metrics show the fleet."""

from __future__ import annotations

import signal
import subprocess

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from common.db import migrate
from common.settings import Settings
from common.storage import storage_from_settings

from .conftest import CALIBRATION, TAQ, Proc, service_env, tiny_spec, verify_artifacts, wait_for, wait_job

pytestmark = pytest.mark.integration

KEY = "fleet-key-0123456789abcdef"
ADMIN = "fleet-admin-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPERATOR = {"Authorization": f"Bearer {ADMIN}"}
#: the tiny Llama's jobs need ~0.65 GiB (mostly the runtime), SmolLM2's ~1 GiB (core.memory's preflight)
CLASSES = "small=cpu:768MiB,large=cpu:4GiB"
SMOLLM2 = "smollm2-135m-instruct"


def smollm2_spec(**overrides) -> dict:
    spec = dict(
        model=SMOLLM2,
        method="uniform",
        bit_budget={"avg_bits": 5.0},
        bit_choices=[4, 8],
        group_size=64,
        exports=["hf"],
        max_tokens=32,
        max_calibration_rows=8,
        seed=0,
    )
    spec.update(overrides)
    return spec


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, pg_database, redis_url, tiny_model_root):
    data = tmp_path_factory.mktemp("fleet")
    config = dict(
        database_url=pg_database(),
        broker_url=redis_url,
        storage_url=f"file://{data / 'objects'}",
        api_keys=f"team:{KEY}",
        admin_key=ADMIN,
        worker_classes=CLASSES,
        heartbeat_seconds="1",
        stale_after_seconds="6",
        reaper_interval_seconds="2",
        requeue_queued_after_seconds="120",
    )
    settings = Settings(data_dir=data, model_roots=[tiny_model_root], **config)
    migrate(settings)
    env = service_env(data_dir=str(data), model_roots=str(tiny_model_root), **config)
    workers: list[Proc] = []

    def start_worker(worker_class: str) -> Proc:
        proc = Proc(
            [TAQ, "worker", "--skip-migrate", "--class", worker_class],
            env,
            data / f"worker-{worker_class}-{len(workers)}.log",
        )
        workers.append(proc)
        wait_for(
            lambda: proc.alive() and " ready." in proc.log_path.read_text(errors="replace"),
            120,
            what=f"{worker_class} worker ready",
        )
        return proc

    def ensure_worker(worker_class: str) -> Proc:
        alive = [p for p in workers if p.alive() and p.proc.args[-1] == worker_class]
        return alive[-1] if alive else start_worker(worker_class)

    with TestClient(create_app(settings)) as client:
        yield {
            "client": client,
            "settings": settings,
            "env": env,
            "start_worker": start_worker,
            "ensure_worker": ensure_worker,
            "workers": workers,
        }
    for proc in workers:
        proc.stop(signal.SIGTERM)


def fleet_view(client) -> dict:
    response = client.get("/v1/workers", headers=OPERATOR)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.timeout(900)
def test_jobs_go_to_the_smallest_class_that_holds_them_and_wait_for_its_workers(fleet):
    client, start_worker = fleet["client"], fleet["start_worker"]
    large = start_worker("large")
    big = client.post("/v1/jobs", headers=AUTH, json=smollm2_spec())
    tiny = client.post("/v1/jobs", headers=AUTH, json=tiny_spec("taq"))
    assert big.status_code == tiny.status_code == 202, (big.text, tiny.text)
    assert big.json()["worker_class"] == "large" and tiny.json()["worker_class"] == "small"

    done = wait_job(client, big.json()["id"], timeout=600, headers=AUTH)
    assert done["status"] == "succeeded", done["error"]
    assert "hf" in verify_artifacts(client, done["id"], AUTH)
    # a succeeded job keeps its artifacts, not its work files (layer checkpoints at every width)
    storage = storage_from_settings(fleet["settings"])
    assert storage.list(f"jobs/{done['id']}/artifacts/") and storage.list(f"jobs/{done['id']}/work/") == []
    # no small worker yet: the tiny job waits in its own queue; the large worker never took it
    waiting = client.get(f"/v1/jobs/{tiny.json()['id']}", headers=AUTH).json()
    assert waiting["status"] == "queued" and waiting["attempts"] == 0

    view = fleet_view(client)
    classes = {c["name"]: c for c in view["classes"]}
    assert classes["small"] == {
        "name": "small",
        "device": "cpu",
        "memory_bytes": 768 << 20,
        "queue": "quantize.small",
        "queued_jobs": 1,
        "live_workers": 0,
    }
    assert classes["large"]["live_workers"] == 1 and classes["large"]["queued_jobs"] == 0
    (worker,) = view["workers"]
    assert worker["worker_class"] == "large" and worker["device"] == "cpu"
    assert (
        worker["memory_bytes"] == 4 << 30 and worker["job_id"] is None and worker["name"].endswith(f":{large.proc.pid}")
    )
    metrics = client.get("/metrics").text
    assert 'taq_queue_depth{worker_class="small"} 1.0' in metrics
    assert 'taq_live_workers{worker_class="large"} 1.0' in metrics

    start_worker("small")
    finished = wait_job(client, tiny.json()["id"], timeout=300, headers=AUTH)
    assert finished["status"] == "succeeded" and finished["attempts"] == 1, finished["error"]
    assert {c["name"]: c["queued_jobs"] for c in fleet_view(client)["classes"]} == {"small": 0, "large": 0}


def test_pinning_a_class_too_small_is_422_naming_the_estimate_and_the_class(fleet):
    client = fleet["client"]
    response = client.post("/v1/jobs", headers=AUTH, json=smollm2_spec(worker_class="small"))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "job_too_large"
    assert "the pinned worker class 'small' has 0.75 GiB" in error["message"]
    details = error["details"]
    assert details["worker_class"] == "small" and details["limit_bytes"] == 768 << 20
    assert details["estimate_bytes"] > 768 << 20
    unknown = client.post("/v1/jobs", headers=AUTH, json=tiny_spec("taq", worker_class="gpu80"))
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "unknown_worker_class"
    assert "declared: small (cpu, 0.75 GiB), large (cpu, 4.00 GiB)" in unknown.json()["error"]["message"]
    # pinning a larger class than needed is allowed
    fleet["ensure_worker"]("large")
    pinned = client.post("/v1/jobs", headers=AUTH, json=tiny_spec("uniform", worker_class="large", seed=7))
    assert pinned.status_code == 202 and pinned.json()["worker_class"] == "large"
    assert wait_job(client, pinned.json()["id"], timeout=300, headers=AUTH)["status"] == "succeeded"


def test_a_job_no_class_holds_is_422_naming_the_largest_class(fleet):
    small_fleet = fleet["settings"].model_copy(update={"worker_classes": "a=cpu:64MiB,b=cpu:256MiB"})
    with TestClient(create_app(small_fleet)) as client:
        response = client.post("/v1/jobs", headers=AUTH, json=smollm2_spec())
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "job_too_large" and error["details"]["worker_class"] == "b"
    assert "the largest worker class, 'b', has 0.25 GiB" in error["message"]
    assert "add a larger worker class to TAQ_WORKER_CLASSES" in error["message"]


@pytest.mark.timeout(900)
def test_a_killed_worker_is_replaced_by_one_of_its_class(fleet):
    client, start_worker = fleet["client"], fleet["start_worker"]
    large = fleet["ensure_worker"]("large")
    spec = smollm2_spec(
        method="taq", calibration=CALIBRATION, bit_budget={"avg_bits": [5.0, 6.0]}, exports=["hf", "gguf"]
    )
    job_id = client.post("/v1/jobs", headers=AUTH, json=spec).json()["id"]

    def running_on_large():
        job = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        assert job["status"] in ("queued", "running"), job
        return job["status"] == "running" and job["stage"] in ("score", "allocate", "quantize", "export")

    wait_for(running_on_large, 300, interval=0.2, what="the job running on the large worker")
    busy = {w["name"]: w["job_id"] for w in fleet_view(client)["workers"]}
    assert job_id in busy.values()
    large.stop(signal.SIGKILL)
    start_worker("large")  # its reaper requeues the job to quantize.large once the heartbeat is stale
    final = wait_job(client, job_id, timeout=900, headers=AUTH)
    assert final["status"] == "succeeded" and final["attempts"] == 2, final["error"]
    assert final["worker_class"] == "large"
    messages = [e["message"] or "" for e in client.get(f"/v1/jobs/{job_id}/events", headers=AUTH).json()]
    assert any("requeued" in m for m in messages)
    # the killed worker's row went stale: only live workers are listed
    names = {w["name"] for w in fleet_view(client)["workers"]}
    assert not any(n.endswith(f":{large.proc.pid}") for n in names)


def test_workers_view_needs_the_operator_key(fleet):
    client = fleet["client"]
    assert client.get("/v1/workers").status_code == 401
    forbidden = client.get("/v1/workers", headers=AUTH)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    assert client.get("/v1/workers", headers={"Authorization": "Bearer not-a-key-0123456789"}).status_code == 401


def test_bad_classes_stop_the_processes_with_exit_2(fleet, tmp_path):
    env = dict(fleet["env"], TAQ_DATA_DIR=str(tmp_path))
    undeclared = subprocess.run(
        [TAQ, "worker", "--skip-migrate", "--class", "gpu80"], env=env, capture_output=True, text=True, timeout=120
    )
    assert undeclared.returncode == 2
    assert "worker class 'gpu80' is not declared (declared: small, large)" in undeclared.stderr
    unnamed = subprocess.run([TAQ, "worker", "--skip-migrate"], env=env, capture_output=True, text=True, timeout=120)
    assert unnamed.returncode == 2 and "start the worker with --class NAME" in unnamed.stderr
    for bad, words in [
        ("small=cpu:1GiB,small=cuda:2GiB", "'small' is declared twice"),
        ("x=tpu:1GiB", "unknown device 'tpu'"),
        ("x=cpu:0MiB", "more than 0"),
        ("nonsense", "entry 'nonsense' must look like name=device:memory"),
    ]:
        api = subprocess.run(
            [TAQ, "api", "--skip-migrate"],
            env=dict(env, TAQ_WORKER_CLASSES=bad),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert api.returncode == 2 and words in api.stderr, (bad, api.stderr[-500:])
    shown = subprocess.run([TAQ, "admin", "config"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and ADMIN not in shown.stdout and '"admin_key": "<set>"' in shown.stdout
    assert '"worker_classes": "small=cpu:768MiB,large=cpu:4GiB"' in shown.stdout
