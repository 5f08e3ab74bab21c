"""(a) The embedded default end to end: `taq serve` as a subprocess on a free loopback port
(SQLite, file:// storage, kombu filesystem broker, a worker subprocess), jobs on the tiny Llama to
`succeeded`, every artifact downloaded and checked against the listing, then Ctrl-C."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
from pathlib import Path

import pytest
from rich.console import Console

from .conftest import calibration_jsonl, serve_embedded, tiny_spec, verify_artifacts, wait_job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_root):
    with serve_embedded(tmp_path_factory.mktemp("embedded"), tiny_model_root) as service:
        yield service


def test_jobs_succeed_and_artifacts_verify(served):
    client, data = served["client"], served["data"]
    dataset = client.post("/v1/datasets", files={"file": ("cal.jsonl", calibration_jsonl())})
    assert dataset.status_code == 201, dataset.text
    ds = dataset.json()
    assert (data / "objects" / "datasets" / f"{ds['sha256']}.jsonl").is_file()
    uniform = client.post("/v1/jobs", json=tiny_spec("uniform", exports=["hf", "gguf"])).json()
    taq = client.post(
        "/v1/jobs", json=tiny_spec("taq", calibration=None, calibration_dataset_id=ds["id"], eval_fraction=0.25)
    ).json()
    for job in (uniform, taq):
        assert job["status"] == "queued"
        final = wait_job(client, job["id"], timeout=300)
        assert final["status"] == "succeeded", final
        assert final["progress"] == 1.0 and final["started_at"] and final["finished_at"]
        result = final["result"]
        assert result["device"] == "cpu"
        (budget,) = result["budgets"]
        assert budget["effective_bits"] <= 6.0 + 1e-9
        assert set(budget["bits"].values()) <= {4, 8}
        blobs = verify_artifacts(client, job["id"])
        assert {"manifest.json", "profile.json", "profile.png", "hf"} <= set(blobs)
        assert blobs["profile.png"][:8] == b"\x89PNG\r\n\x1a\n"
        manifest_text = blobs["manifest.json"].decode()
        for name, body in blobs.items():
            if name != "manifest.json" and "/" in name:  # every exported file is pinned in the manifest
                assert hashlib.sha256(body).hexdigest() in manifest_text, name
        profile = client.get(f"/v1/jobs/{job['id']}/profile").json()
        assert [l["index"] for l in profile["layers"]] == [0, 1, 2, 3]
        assert {l["name"]: l["bits"] for l in profile["layers"]} == budget["bits"]
        png = client.get(f"/v1/jobs/{job['id']}/profile", params={"format": "png"})
        assert png.headers["content-type"] == "image/png" and png.content == blobs["profile.png"]
        events = client.get(f"/v1/jobs/{job['id']}/events").json()
        stages = [e["stage"] for e in events if e["kind"] == "stage"]
        assert stages == ["load", "calibrate", "score", "allocate", "quantize", "export", "evaluate", "publish"]
        assert [e["status"] for e in events if e["kind"] == "status"] == ["queued", "running", "succeeded"]
    assert "model.gguf" in [a["name"] for a in client.get(f"/v1/jobs/{uniform['id']}/artifacts").json()]
    assert "eval.json" in [a["name"] for a in client.get(f"/v1/jobs/{taq['id']}/artifacts").json()]
    listed = client.get("/v1/jobs", params={"status": "succeeded"}).json()["items"]
    assert [j["id"] for j in listed][:2] == [taq["id"], uniform["id"]]
    metrics = client.get("/metrics").text
    assert re.search(r'taq_jobs\{status="succeeded"\} [2-9]', metrics)
    assert 'taq_stage_duration_seconds_count{stage="score"}' in metrics


def test_profile_reuse_and_eval_dataset(served):
    """A second job reuses the first one's profile (no scoring) and evaluates on a dataset."""
    client = served["client"]
    source = client.get("/v1/jobs", params={"status": "succeeded"}).json()["items"][0]
    assert source["spec"]["method"] == "taq"
    ds = client.post("/v1/datasets", files={"file": ("cal.jsonl", calibration_jsonl())}).json()
    spec = tiny_spec(
        "taq",
        calibration=None,
        profile_from_job_id=source["id"],
        eval_dataset_id=ds["id"],
        bit_budget={"avg_bits": 5.5},
    )
    job = client.post("/v1/jobs", json=spec).json()
    final = wait_job(client, job["id"], timeout=300)
    assert final["status"] == "succeeded", final["error"]
    reused = client.get(f"/v1/jobs/{job['id']}/profile").json()["layers"]
    original = client.get(f"/v1/jobs/{source['id']}/profile").json()["layers"]
    assert [l["scores"] for l in reused] == [l["scores"] for l in original]
    assert final["result"]["budgets"][0]["effective_bits"] <= 5.5
    evaluation = json.loads(client.get(f"/v1/jobs/{job['id']}/artifacts/eval.json").content)
    assert evaluation["n_items"] == 4 and "uniform" in evaluation["fidelity"]

    # `make demo`'s summary (scripts/demo.py) reads the same calls and renders this job
    loader = importlib.util.spec_from_file_location("demo", Path(__file__).parents[2] / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(demo)
    demo.console = Console(record=True, width=160)
    demo.summary(client, final, served["data"], str(client.base_url))
    text = demo.console.export_text()
    for expected in ("TAQ kept the task's layers precise", "full precision", "uniform", "TAQ − uniform"):
        assert expected in text, text
    bits = evaluation["meta"]["effective_bits"]
    assert f"{bits:.3f}" in text and f"{evaluation['meta']['uniform_effective_bits']:.3f}" in text
    assert f"/v1/jobs/{job['id']}/artifacts/" in text and "eval.json" in text


def test_per_linear_allocation_job(served):
    """allocation_unit "linear" through the service: bits per linear in the result, the profile
    (DB rows and profile.json), bitmap.json and the manifest, and both exports verify."""
    client = served["client"]
    source = next(
        j
        for j in client.get("/v1/jobs", params={"status": "succeeded"}).json()["items"]
        if j["spec"]["method"] == "taq" and not j["spec"].get("profile_from_job_id")
    )
    spec = tiny_spec(
        "taq",
        calibration=None,
        profile_from_job_id=source["id"],
        bit_budget={"avg_bits": 5.5},
        allocation_unit="linear",
        exports=["hf", "gguf"],
    )
    job = client.post("/v1/jobs", json=spec).json()
    final = wait_job(client, job["id"], timeout=300)
    assert final["status"] == "succeeded", final["error"]
    (budget,) = final["result"]["budgets"]
    layers = client.get(f"/v1/jobs/{job['id']}/profile").json()["layers"]
    linears = {l["name"]: l["bits"] for layer in layers for l in layer["linears"]}
    assert len(linears) == 7 * len(layers) and budget["bits"] == linears
    assert budget["effective_bits"] <= 5.5 and set(linears.values()) <= {4, 8, 16}
    blobs = verify_artifacts(client, job["id"])
    manifest = json.loads(blobs["manifest.json"])
    assert manifest["bits_by_linear"] == linears and "bits_by_layer" not in manifest
    assert manifest["spec"]["allocation_unit"] == "linear"
    assert json.loads(blobs["bitmap.json"])["budgets"][0]["unit"] == "linear"
    stored = json.loads(blobs["profile.json"])
    assert {l["name"]: l["bits"] for layer in stored["layers"] for l in layer["linears"]} == linears


def test_range_etag_and_event_stream(served):
    client = served["client"]
    job_id = client.get("/v1/jobs", params={"status": "succeeded", "limit": 1}).json()["items"][0]["id"]
    full = client.get(f"/v1/jobs/{job_id}/artifacts/hf")
    assert full.headers["content-type"] == "application/x-tar"
    assert 'filename="hf.tar"' in full.headers["content-disposition"]
    part = client.get(f"/v1/jobs/{job_id}/artifacts/hf", headers={"Range": "bytes=1000-5999"})
    assert part.status_code == 206 and part.content == full.content[1000:6000]
    assert part.headers["content-range"] == f"bytes 1000-5999/{len(full.content)}"
    tail = client.get(f"/v1/jobs/{job_id}/artifacts/manifest.json", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and len(tail.content) == 10
    etag = full.headers["etag"]
    assert client.get(f"/v1/jobs/{job_id}/artifacts/hf", headers={"If-None-Match": etag}).status_code == 304
    stale = client.get(f"/v1/jobs/{job_id}/artifacts/hf", headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200
    assert (
        client.get(f"/v1/jobs/{job_id}/artifacts/manifest.json", headers={"Range": "bytes=99999999-"}).status_code
        == 416
    )
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as stream:
        text = "".join(stream.iter_text())
    assert "event: stage" in text and text.rstrip().endswith('"status": "succeeded"}')
    payloads = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert payloads[-1] == {"job_id": job_id, "status": "succeeded"}


def test_ctrl_c_stops_api_and_worker(served):
    proc = served["proc"]
    log = proc.log_path.read_text()
    worker_pid = int(re.search(r'"msg": "worker started", "pid": (\d+)', log).group(1))
    assert proc.stop(signal.SIGINT, timeout=60) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)
