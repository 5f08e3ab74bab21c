"""`make demo`: the main job on the embedded default, end to end over HTTP, told in one screen.

Starts `taq serve` (SQLite, file:// storage, a broker that needs no server) on a loopback port
with its logs in a file, uploads the capitals task (64 calibration rows, 173 eval rows),
quantizes SmolLM2-135M-Instruct with TAQ-Grad (the task loss's own sensitivity, `taq_grad`) under
a 4.5-bit budget and evaluates it. The terminal shows a progress bar per stage, then full
precision, TAQ-Grad and uniform at the same bits on the eval split (task score with its interval,
gold-answer NLL, KL, effective bits, size of the decoder linears), the layers it found most
task-relevant and their bits, where the artifacts are and the dashboard's address. The service
keeps running for the dashboard until Ctrl-C when the demo runs in a terminal; `--no-keep` (or a
stdin that is not a terminal) stops it after the summary.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.tables import format_interval  # noqa: E402
from core.pipeline import STAGE_SHARES, STAGES, overall_progress  # noqa: E402

TASK = ROOT / "bench" / "tasks" / "capitals"
MODEL = "smollm2-135m-instruct"
METHOD = "taq_grad"
#: how the summary names a job's method
LABELS = {"taq": "TAQ", "taq_kl": "TAQ-KL", "taqo": "TAQO", "taq_grad": "TAQ-Grad", "uniform": "uniform"}
NOTE_WIDTH = 36
console = Console(highlight=False, soft_wrap=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=4.5, help="average bits per weight (default 4.5)")
    parser.add_argument("--port", type=int, default=None, help="default: 8000 when free, else any free port")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--no-keep", dest="keep", action="store_false", help="stop the service after the summary")
    keep.add_argument("--keep", dest="keep", action="store_true", help="keep it running even without a terminal")
    parser.set_defaults(keep=None)
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("TAQ_DEMO_TIMEOUT", "3600")))
    return parser.parse_args()


def pick_port(wanted: int | None) -> int:
    for port in [wanted or 8000, 0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                if wanted:
                    sys.exit(f"port {wanted} is in use; pick another with --port")
                continue
            return sock.getsockname()[1]
    raise AssertionError("binding port 0 cannot fail")


def wait_ready(client: httpx.Client, server: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"taq serve exited early with code {server.returncode}; its log: {log_path}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    sys.exit(f"taq serve did not become ready in {timeout:.0f} s; its log: {log_path}")


def check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        sys.exit(f"HTTP {response.status_code} on {response.request.url.path}: {response.text}")
    return response.json()


def upload(client: httpx.Client, path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return check(client.post("/v1/datasets", files={"file": (path.name, fh)}))


def follow(client: httpx.Client, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One bar per stage, advanced from the job's overall progress (core.pipeline.STAGE_SHARES)
    and labelled with the latest event's message, until the job leaves queued/running."""
    columns = [
        TextColumn("{task.fields[stage]:>9}"),
        BarColumn(bar_width=24),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("[dim]{task.fields[note]}"),
    ]
    bars: dict[str, TaskID] = {}
    notes: dict[str, str] = {}
    after, deadline = 0, time.monotonic() + timeout
    with Progress(*columns, console=console) as progress:
        while True:
            for event in check(client.get(f"/v1/jobs/{job['id']}/events", params={"after": after})):
                after = max(after, event["id"])
                if event.get("stage") in STAGES and event.get("message"):
                    stage = event["stage"]
                    if stage not in bars:
                        bars[stage] = progress.add_task("", total=1.0, stage=stage, note="")
                    notes[stage] = event["message"]
                    progress.update(bars[stage], note=event["message"][:NOTE_WIDTH])
            current = job.get("stage")
            if current in STAGES:
                for stage in STAGES[: STAGES.index(current) + 1]:
                    if stage not in bars:
                        bars[stage] = progress.add_task("", total=1.0, stage=stage, note="")
                    share = (job.get("progress", 0.0) - overall_progress(stage, 0.0)) / STAGE_SHARES[stage]
                    done = 1.0 if stage != current else max(0.0, min(1.0, share))
                    progress.update(bars[stage], completed=done)
            if job["status"] not in ("queued", "running"):
                if job["status"] == "succeeded":
                    timings = (job.get("result") or {}).get("timings") or {}
                    for stage, bar in bars.items():
                        seconds = timings.get(stage)
                        if "skipped" in notes.get(stage, ""):
                            note = "skipped: its output was already stored"
                        else:
                            note = "done" if seconds is None else f"done in {seconds:.1f} s"
                        progress.update(bar, completed=1.0, note=note)
                return job
            if time.monotonic() > deadline:
                sys.exit(f"job {job['id']} did not finish in {timeout:.0f} s")
            time.sleep(1)
            job = check(client.get(f"/v1/jobs/{job['id']}"))


def story_table(report: dict[str, Any], linear_params: int, label: str) -> Table:
    """Full precision, the method and uniform at equal bits: contains, gold NLL, KL, bits, size."""
    meta = report["meta"]
    source = meta.get("full_precision") or {}
    bits = {"full_precision": source.get("bits"), "quantized": meta["effective_bits"]}
    bits["uniform"] = meta.get("uniform_effective_bits")
    table = Table(
        Column("", no_wrap=True),
        Column("contains ↑", no_wrap=True),
        Column("gold NLL ↓", no_wrap=True),
        "KL ↓",
        "bits",
        "MiB",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    labels = {"full_precision": "full precision", "quantized": label, "uniform": "uniform"}
    for name, label in labels.items():
        teacher = report["teacher_forced"].get(name)
        if teacher is None:
            continue
        kl = (report["fidelity"].get(name) or {}).get("mean_kl")
        width = bits.get(name)
        table.add_row(
            label,
            format_interval((report["metrics"].get(name) or {}).get("contains"), 2),
            format_interval(teacher.get("gold_nll"), 2),
            "-" if kl is None else f"{kl:.3f}",
            "-" if width is None else f"{width:.3f}",
            "-" if width is None else f"{width * linear_params / 8 / 2**20:.1f}",
        )
    return table


def verdicts(report: dict[str, Any], label: str) -> list[str]:
    lines = []
    for c in report.get("comparisons") or []:
        if c["baseline"] == "uniform" and c["metric"] in ("contains", "gold_nll"):
            d = c["difference"]
            lines.append(
                f"{label} − uniform, {c['metric']}: {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] → "
                f"{c['verdict'].replace('_', ' ')}"
            )
    return lines


def layers_table(profile: dict[str, Any], label: str, top: int = 6) -> Table:
    ranked = sorted(profile["layers"], key=lambda layer: layer["importance"], reverse=True)[:top]
    table = Table("layer", "importance", "bits", title=f"the {top} layers {label} ranks highest", box=box.SIMPLE_HEAD)
    for layer in ranked:
        table.add_row(layer["name"], f"{layer['importance']:.3g}", str(layer.get("bits") or "-"))
    return table


def summary(client: httpx.Client, job: dict[str, Any], data_dir: Path, base: str) -> None:
    job_id = job["id"]
    label = LABELS.get(job["spec"]["method"], job["spec"]["method"])
    artifacts = check(client.get(f"/v1/jobs/{job_id}/artifacts"))
    profile = check(client.get(f"/v1/jobs/{job_id}/profile"))
    report = check(client.get(f"/v1/jobs/{job_id}/artifacts/eval.json"))
    report = report["budgets"][0] if "budgets" in report else report
    linear_params = sum(layer["params"] for layer in profile["layers"])
    counts = " · ".join(f"{n} layers at {b} bits" for b, n in report["variants"]["quantized"]["bits_histogram"].items())
    console.print(f"\n[bold]{label} kept the task's layers precise:[/] {counts}")
    console.print(layers_table(profile, label))
    console.print(f"\n[bold]capitals eval split[/] · {report['n_items']} items · mean [95 % bootstrap interval]")
    console.print(story_table(report, linear_params, label))
    formats = "+".join(sorted((report["meta"].get("full_precision") or {}).get("formats") or {})) or "source"
    console.print(
        "  KL: next-token KL from full precision at the answer positions; bits: stored bits per decoder-linear"
        f" weight (full precision: the source as stored, {formats}); MiB: those linears' size"
    )
    for line in verdicts(report, label):
        console.print("  " + line)
    console.print("\n[bold]artifacts[/]")
    for art in artifacts:
        console.print(f"  {art['name']:16s} {art['format']:5s} {art['size']:>12,d} B  sha256 {art['sha256'][:16]}…")
    console.print(f"  stored under {data_dir / 'objects' / 'jobs' / job_id / 'artifacts'}")
    names = [a["name"] for a in artifacts]
    example = next((n for n in names if n.endswith(".gguf")), "manifest.json")
    console.print(f"  download: curl -O {base}/v1/jobs/{job_id}/artifacts/{example}")
    console.print(f"  the evaluation as a table: taq status {job_id} --url {base}")


def main() -> None:
    args = parse_args()
    keep = sys.stdin.isatty() if args.keep is None else args.keep
    port = pick_port(args.port)
    base = f"http://127.0.0.1:{port}"
    data_dir = Path(os.environ.get("TAQ_DATA_DIR", ROOT / ".taq")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "demo-service.log"
    taq = Path(sys.executable).with_name("taq")
    console.print(f"[bold]taq serve[/] on {base} · data in {data_dir} · service log: {log_path}")
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [str(taq), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "TAQ_DATA_DIR": str(data_dir)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            wait_ready(client, server, log_path)
            calibration, evaluation = upload(client, TASK / "calibration.jsonl"), upload(client, TASK / "eval.jsonl")
            console.print(f"capitals task: {calibration['rows']} calibration rows, {evaluation['rows']} eval rows")
            spec = {
                "model": MODEL,
                "method": METHOD,
                "calibration_dataset_id": calibration["id"],
                "eval_dataset_id": evaluation["id"],
                "eval_controls": False,
                "bit_budget": {"avg_bits": args.budget},
                "bit_choices": [4, 8, 16],
                "group_size": 128,
                "exports": ["hf", "gguf"],
                "max_calibration_rows": 64,
                "max_tokens": 64,
                "seed": 0,
            }
            job = check(client.post("/v1/jobs", json=spec))
            console.print(f"job {job['id']}: {MODEL}, {LABELS[METHOD]}, {args.budget} bits, exports hf + gguf")
            job = follow(client, job, args.timeout)
            if job["status"] != "succeeded":
                error = job.get("error") or {}
                sys.exit(f"job ended {job['status']}: {error.get('code')}: {error.get('message')} (log: {log_path})")
            summary(client, job, data_dir, base)
        console.print(f"\n[bold]dashboard:[/] {base}/ui/#/job/{job['id']}")
        if keep:
            console.print("the service keeps running for the dashboard; Ctrl-C stops it")
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
