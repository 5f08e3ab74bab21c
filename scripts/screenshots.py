"""Screenshots of the dashboard (docs/screenshots/*.png) from real, finished jobs.

Starts `taq serve` on the embedded default in a data directory, submits two jobs on the same model
calibrated on two tasks (bench/tasks capitals and arithmetic; the capitals job is a three-budget
sweep evaluated on held-out capitals questions) and a third that is cancelled while queued, waits
for them, then drives headless Chromium (Debian's `chromium`, through Playwright) over the jobs
list, the new-job form, the job page (stages and profile; evaluation and Pareto plot; artifacts),
the comparison and the job page at phone width.

    .venv/bin/python scripts/screenshots.py          # SmolLM2-135M-Instruct: the jobs take ~17 min on 2 busy cores
    .venv/bin/python scripts/screenshots.py --data-dir /tmp/shots-data   # keep the jobs; a rerun reuses them
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "bench" / "tasks"
SPEC = {
    "method": "taq",
    "bit_choices": [4, 8, 16],
    "group_size": 64,
    "exports": ["hf", "gguf"],
    "max_calibration_rows": 32,
    "max_tokens": 64,
    "seed": 0,
}
SWEEP = [4.5, 5.0, 6.0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        sys.exit(f"HTTP {response.status_code}: {response.text}")
    return response.json()


def head_rows(path: Path, n: int) -> bytes:
    return "".join(path.read_text().splitlines(keepends=True)[:n]).encode()


def upload(client: httpx.Client, name: str, data: bytes) -> str:
    return check(client.post("/v1/datasets", files={"file": (name, data)}))["id"]


def submit_jobs(client: httpx.Client, model: str, eval_rows: int) -> dict[str, str]:
    capitals = upload(client, "capitals-calibration.jsonl", head_rows(TASKS / "capitals" / "calibration.jsonl", 32))
    arithmetic = upload(
        client, "arithmetic-calibration.jsonl", head_rows(TASKS / "arithmetic" / "calibration.jsonl", 32)
    )
    evaluation = upload(client, "capitals-eval.jsonl", head_rows(TASKS / "capitals" / "eval.jsonl", eval_rows))
    sweep = check(
        client.post(
            "/v1/jobs",
            json={
                **SPEC,
                "model": model,
                "calibration_dataset_id": capitals,
                "eval_dataset_id": evaluation,
                "bit_budget": {"avg_bits": SWEEP},
            },
        )
    )
    other = check(
        client.post(
            "/v1/jobs",
            json={
                **SPEC,
                "model": model,
                "calibration_dataset_id": arithmetic,
                "bit_budget": {"avg_bits": 4.5},
                "exports": ["gguf"],
            },
        )
    )
    extra = check(
        client.post("/v1/jobs", json={**SPEC, "model": model, "method": "uniform", "bit_budget": {"avg_bits": 4.5}})
    )
    check(client.post(f"/v1/jobs/{extra['id']}/cancel"))
    return {"sweep": sweep["id"], "other": other["id"]}


def wait(client: httpx.Client, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        job = check(client.get(f"/v1/jobs/{job_id}"))
        line = f"{job_id} {job['status']} {job.get('stage') or ''} {100 * (job.get('progress') or 0):.0f} %"
        if line != last:
            print(line, flush=True)
            last = line
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                sys.exit(f"{job_id} ended {job['status']}: {json.dumps(job.get('error'))}")
            return job
        if time.monotonic() > deadline:
            sys.exit(f"{job_id} did not finish in {timeout:.0f} s")
        time.sleep(3)


def existing(client: httpx.Client) -> dict[str, str] | None:
    """Jobs of an earlier run in the same data directory: the sweep and the other calibration."""
    jobs = check(client.get("/v1/jobs", params={"status": "succeeded", "limit": 100}))["items"]
    sweep = next((j for j in jobs if isinstance(j["spec"]["bit_budget"]["avg_bits"], list)), None)
    other = next((j for j in jobs if not isinstance(j["spec"]["bit_budget"]["avg_bits"], list)), None)
    return {"sweep": sweep["id"], "other": other["id"]} if sweep and other else None


DRAWN = """(id) => { const c = document.getElementById(id); if (!c || !c.width) return false;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n += 1; return n > 2000; }"""


def shoot(base: str, jobs: dict[str, str], out: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 860}, device_scale_factor=1)

        def go(route: str, ready: str) -> None:
            page.goto(f"{base}/ui/{route}")
            page.wait_for_selector(ready)
            page.wait_for_timeout(600)  # chart animations end

        go("#/jobs", "#jobs-body tr")
        page.screenshot(path=str(out / "jobs.png"))
        go("#/new", "#new-job-form")
        if page.query_selector("#model option[value='smollm2-135m-instruct']"):
            page.select_option("#model", "smollm2-135m-instruct")
        page.set_input_files("#calibration-file", str(TASKS / "capitals" / "calibration.jsonl"))
        page.wait_for_selector("#calibration-status .ok")
        page.select_option("#eval-mode", "fraction")
        page.fill("#budgets", "4.5, 5, 6")
        page.check("input[name=exports][value=gguf]")
        page.screenshot(path=str(out / "new-job.png"), full_page=True)
        go(f"#/job/{jobs['sweep']}", "#profile-chart")
        page.wait_for_function(DRAWN, arg="profile-chart")
        page.wait_for_function(DRAWN, arg="pareto-chart")
        page.wait_for_timeout(600)
        page.set_viewport_size({"width": 1280, "height": 1480})  # header, stages, result, profile
        page.wait_for_timeout(600)
        page.screenshot(path=str(out / "job.png"))
        page.set_viewport_size({"width": 1280, "height": 860})
        page.wait_for_timeout(600)
        page.click("#evaluation .tab:last-child")  # the widest budget, where the variants differ most
        page.wait_for_timeout(300)
        page.locator("#evaluation").screenshot(path=str(out / "evaluation.png"))
        page.click("#artifacts details.snippets summary")
        page.locator("#artifacts").screenshot(path=str(out / "artifacts.png"))
        go(f"#/compare?a={jobs['sweep']}&b={jobs['other']}", "#compare-chart")
        page.wait_for_function(DRAWN, arg="compare-chart")
        page.wait_for_timeout(600)
        page.screenshot(path=str(out / "compare.png"), full_page=True)
        page.set_viewport_size({"width": 375, "height": 812})
        go(f"#/job/{jobs['sweep']}", "#profile-chart")
        page.wait_for_function(DRAWN, arg="profile-chart")
        page.wait_for_timeout(600)
        page.screenshot(path=str(out / "job-phone.png"))
        browser.close()
    for png in sorted(out.glob("*.png")):
        print(f"wrote {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--data-dir", type=Path, help="keep the service's data here (default: a temporary directory)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--eval-rows", type=int, default=24)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    data = args.data_dir or Path(tempfile.mkdtemp(prefix="taq-screenshots-"))
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAQ_")}
    env.update({"TAQ_DATA_DIR": str(data.resolve()), "TAQ_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"})
    taq = Path(sys.executable).with_name("taq")
    server = subprocess.Popen(
        [str(taq), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        start_new_session=True,
        stdout=open(data / "serve.log", "ab"),  # noqa: SIM115 - the server process writes it
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    sys.exit(f"taq serve exited with {server.returncode}; see {data / 'serve.log'}")
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    sys.exit("taq serve did not become ready")
                time.sleep(1)
            jobs = existing(client) or submit_jobs(client, args.model, args.eval_rows)
            for job_id in jobs.values():
                wait(client, job_id, args.timeout)
            shoot(base, jobs, args.out)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        if args.data_dir is None:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
