"""The main job on the embedded default, end to end over HTTP.

Starts `taq serve` (SQLite, file:// storage, a broker that needs no server) on a free loopback
port, uploads a calibration set, quantizes SmolLM2-135M-Instruct with TAQ under a 4.5-bit budget,
prints the result and where the artifacts are, then stops the service.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION = ROOT / "bench" / "tasks" / "capitals" / "calibration.jsonl"
JOB_TIMEOUT_S = float(os.environ.get("TAQ_DEMO_TIMEOUT", "1800"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(client: httpx.Client, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"taq serve exited early with code {server.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    sys.exit("taq serve did not become ready in time")


def check(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        sys.exit(f"HTTP {response.status_code}: {response.text}")
    return response.json()


def main() -> None:
    port = free_port()
    data_dir = Path(os.environ.get("TAQ_DATA_DIR", ROOT / ".taq")).resolve()
    env = {**os.environ, "TAQ_DATA_DIR": str(data_dir)}
    taq = Path(sys.executable).with_name("taq")
    print(f"starting: taq serve --port {port}   (data dir {data_dir})", flush=True)
    server = subprocess.Popen(
        [str(taq), "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, start_new_session=True
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_ready(client, server)
            with CALIBRATION.open("rb") as fh:
                dataset = check(client.post("/v1/datasets", files={"file": (CALIBRATION.name, fh)}))
            print(f"dataset {dataset['id']}: {dataset['rows']} rows, answers={dataset['has_answers']}")
            spec = {
                "model": "smollm2-135m-instruct",
                "method": "taq",
                "calibration_dataset_id": dataset["id"],
                "bit_budget": {"avg_bits": 4.5},
                "bit_choices": [4, 8, 16],
                "group_size": 128,
                "exports": ["hf", "gguf"],
                "max_calibration_rows": 64,
                "max_tokens": 64,
                "seed": 0,
            }
            job = check(client.post("/v1/jobs", json=spec))
            print(f"job {job['id']} {job['status']}", flush=True)
            deadline = time.monotonic() + JOB_TIMEOUT_S
            last = None
            while job["status"] in ("queued", "running"):
                if time.monotonic() > deadline:
                    sys.exit(f"job {job['id']} did not finish in {JOB_TIMEOUT_S:.0f} s")
                time.sleep(2)
                job = check(client.get(f"/v1/jobs/{job['id']}"))
                line = f"  {job['status']:9s} {job.get('stage') or '':10s} {100 * (job.get('progress') or 0):5.1f} %"
                if line != last:
                    print(line, flush=True)
                    last = line
            if job["status"] != "succeeded":
                sys.exit(f"job ended {job['status']}: {json.dumps(job.get('error'))}")
            artifacts = check(client.get(f"/v1/jobs/{job['id']}/artifacts"))
            print(json.dumps(job["result"], indent=2)[:4000])
            print("artifacts:")
            for art in artifacts:
                print(f"  {art['name']:40s} {art['format']:8s} {art['size']:>12,d}  {art['sha256'][:16]}")
            print(f"stored under {data_dir / 'objects' / 'jobs' / job['id'] / 'artifacts'}")
            print(f"download: curl -O http://127.0.0.1:{port}/v1/jobs/{job['id']}/artifacts/<name>")
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
