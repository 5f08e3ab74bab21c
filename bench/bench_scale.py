"""Scale benchmark: quantize random-weight Llama checkpoints of real sizes through the service (CPU).

    python bench/bench_scale.py write --shape 1b|8b|tiny [--out bench/out/scale] [--seed 0]
    python bench/bench_scale.py run --shape 8b --quantizer rtn gptq --rows 8 --max-tokens 128 \
        [--budget 4.5] [--method taq] [--json bench/out/scale.json] [--markdown bench/out/scale.md]

`write` writes `<out>/llama-<shape>-shape/` (bench/scale_models.py: LlamaConfig, bf16 safetensors
shards ≤ 2 GB + index, SmolLM2 tokenizer; weights seeded normal std 0.02, norms ones, seed 0 by
default); a complete directory whose index matches is left alone.

`run` writes the checkpoint if needed, starts `taq serve` (embedded default: SQLite, file storage,
filesystem broker, no API keys on loopback) with its own `TAQ_DATA_DIR` under
`<out>/run-<timestamp>/`, `TAQ_MODEL_ROOTS=<out>`, `TAQ_WORKER_DEVICE=cpu` and
`TAQ_WORKER_MEMORY_BYTES` (`--worker-memory-gib`, default 20), uploads the first `--rows` rows of
bench/tasks/capitals/calibration.jsonl, submits one job per `--quantizer` (bit choices 4/8/16,
group 128, exports hf + gguf) and follows each to the end. Per job it records the status, the
client-side wall time (submit → final state), the job's `result.timings`, the memory the worker
reports (`result.resources`, when the service has it) and, independently, the memory sampled from
/proc/<worker pid>/status every 0.5 s (VmRSS / RssAnon peaks, VmHWM after a reset through
/proc/<pid>/clear_refs at submit; per-stage peaks bucket the samples by the timestamps of the job's
stage events, which also give each stage's wall time), the checkpoint size on disk,
peak RSS / checkpoint size and the artifacts' sizes. The artifacts (`<run dir>/data/objects`) are
deleted at the end unless `--keep-artifacts` (an 8b run writes tens of GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scale_models import DEFAULT_MAX_SHARD_BYTES, SHAPES, RssSampler, find_worker, proc_status, write_checkpoint  # noqa: E402

STAGES = ["load", "calibrate", "score", "allocate", "quantize", "export", "evaluate", "publish"]
FINAL = {"succeeded", "failed", "cancelled"}
CALIBRATION = ROOT / "bench" / "tasks" / "capitals" / "calibration.jsonl"
GiB = 1 << 30


# ---- the service ----------------------------------------------------------------------------
class Service:
    def __init__(self, run_dir: Path, model_root: Path, memory_bytes: int) -> None:
        self.run_dir, self.data_dir = run_dir, run_dir / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TAQ_")}
        self.env.update(
            TAQ_DATA_DIR=str(self.data_dir),
            TAQ_MODEL_ROOTS=str(model_root),
            TAQ_WORKER_DEVICE="cpu",
            TAQ_WORKER_MEMORY_BYTES=str(memory_bytes),
        )
        taq = Path(sys.executable).parent / "taq"
        self.command = [str(taq if taq.exists() else ROOT / ".venv" / "bin" / "taq"), "serve", "--port", str(self.port)]
        self.log_path = run_dir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.worker_pid: int | None = None

    def start(self, timeout: float = 300) -> None:
        import httpx

        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child process writes it
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"taq serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    self.worker_pid = find_worker(self.proc.pid)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"taq serve not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self, grace: float = 60) -> None:
        """SIGTERM (taq serve hands the running job back and stops its worker), then SIGKILL."""
        if self.proc is None:
            return
        worker = find_worker(self.proc.pid) or self.worker_pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                print(f"taq serve did not stop in {grace:.0f} s; killing it", flush=True)
                self.proc.kill()
                self.proc.wait(timeout=10)
        if worker and proc_status(worker) is not None:  # its own session: not in our process group
            os.kill(worker, signal.SIGTERM)
            for _ in range(20):
                if proc_status(worker) is None:
                    break
                time.sleep(0.5)
            else:
                os.kill(worker, signal.SIGKILL)
        self.proc = None


def envelope(response) -> dict:
    try:
        return response.json()
    except ValueError:
        return {"error": {"code": f"http_{response.status_code}", "message": response.text[:500], "details": None}}


def run_job(client, sampler: RssSampler, spec: dict, key: str, *, poll: float, every: float, timeout: float) -> dict:
    t0 = time.monotonic()
    r = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
    if r.status_code >= 400:
        err = envelope(r)
        print(f"  submit refused ({r.status_code}): {json.dumps(err)}", flush=True)
        return {
            "job_id": None,
            "status": "rejected",
            "error": err.get("error", err),
            "wall_s": round(time.monotonic() - t0, 1),
            "server_wall_s": None,
            "timings": None,
            "event_timings": None,
            "reported": None,
            "sampled": None,
            "artifacts": [],
            "artifacts_total_bytes": 0,
        }
    job = r.json()
    print(f"  job {job['id']} {job['status']}", flush=True)
    sampler.begin_job()
    last_print = time.monotonic()
    while True:
        try:
            got = client.get(f"/v1/jobs/{job['id']}")
            if got.status_code == 200:
                job = got.json()
        except Exception as exc:  # noqa: BLE001 - a slow answer under load: poll again
            print(f"  poll failed: {exc!r}", flush=True)
        now = time.monotonic()
        if job["status"] in FINAL:
            break
        if now - t0 > timeout:
            print(f"  timeout after {timeout:.0f} s: cancelling", flush=True)
            client.post(f"/v1/jobs/{job['id']}/cancel")
            timeout = float("inf")
        if now - last_print >= every:
            last_print = now
            rss = proc_status(sampler.pid).get("VmRSS", 0) if sampler.pid and proc_status(sampler.pid) else 0
            print(
                f"  {now - t0:7.0f} s  {job['status']:9} stage={job.get('stage')} "
                f"{100 * job.get('progress', 0):5.1f}%  worker RSS {rss / GiB:.2f} GiB",
                flush=True,
            )
        time.sleep(poll)
    wall = round(time.monotonic() - t0, 1)
    sampled, series = sampler.end_job()
    result = job.get("result") or {}
    intervals = stage_intervals(client, job)
    sampled["peak_rss_by_stage"] = {}
    for stage, start, end in intervals:
        peak = max((rss for t, rss in series if start <= t < end), default=None)
        if peak is not None:
            sampled["peak_rss_by_stage"][stage] = max(peak, sampled["peak_rss_by_stage"].get(stage, 0))
    event_timings: dict[str, float] = {}
    for stage, start, end in intervals:
        event_timings[stage] = round(event_timings.get(stage, 0.0) + end - start, 3)
    record = {
        "job_id": job["id"],
        "status": job["status"],
        "error": job.get("error"),
        "wall_s": wall,
        "server_wall_s": _seconds(job.get("started_at"), job.get("finished_at")),
        "timings": result.get("timings"),
        "event_timings": event_timings,
        "reported": result.get("resources"),
        "sampled": sampled,
    }
    if job["status"] != "succeeded":
        print(f"  job {job['id']} {job['status']}: {json.dumps({'error': job.get('error')})}", flush=True)
    arts = client.get(f"/v1/jobs/{job['id']}/artifacts")
    record["artifacts"] = (
        [{k: a.get(k) for k in ("name", "format", "kind", "size")} for a in arts.json()]
        if arts.status_code == 200
        else []
    )
    record["artifacts_total_bytes"] = sum(a["size"] or 0 for a in record["artifacts"])
    return record


def _epoch(stamp: str) -> float:
    when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _seconds(start: str | None, end: str | None) -> float | None:
    return round(_epoch(end) - _epoch(start), 1) if start and end else None


def stage_intervals(client, job: dict) -> list[tuple[str, float, float]]:
    """(stage, start, end) in epoch seconds from the job's `stage` events; the last one ends when
    the job finished."""
    events, after = [], 0
    while True:
        r = client.get(f"/v1/jobs/{job['id']}/events", params={"after": after})
        page = r.json() if r.status_code == 200 else []
        if not page:
            break
        events += page
        after = page[-1]["id"]
    starts = [(e["stage"], _epoch(e["created_at"])) for e in events if e["kind"] == "stage" and e.get("stage")]
    end = _epoch(job["finished_at"]) if job.get("finished_at") else time.time()
    return [(stage, t, starts[i + 1][1] if i + 1 < len(starts) else end) for i, (stage, t) in enumerate(starts)]


def machine(env: dict) -> dict:
    mem = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    threads = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env, capture_output=True, text=True
    ).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": mem,
        "torch_threads_worker_env": int(threads) if threads.isdigit() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            None,
        ),
    }


# ---- report -----------------------------------------------------------------------------------
def _gib(n) -> str:
    return "—" if n is None else f"{n / GiB:.2f}"


def _s(x) -> str:
    return "—" if x is None else f"{x:.1f}"


def time_baseline(args, model_id: str, env: dict, quantizer: str, allocator: str = "worker") -> dict | None:
    """bench/scale_baseline.py in its own process, with the worker's environment (threads and, with
    `allocator` "worker", its allocator settings), while the service is not running: one streamed
    forward pass plus the quantizer at one width."""
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "scale_baseline.py"),
        "--model-root",
        str(Path(args.out).resolve()),
        "--model",
        model_id,
        "--rows",
        str(args.rows),
        "--max-tokens",
        str(args.max_tokens),
        "--quantizer",
        quantizer,
        "--allocator",
        allocator,
    ]
    print(f"baseline ({quantizer}, {allocator} allocator): {shlex.join(cmd)}", flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  baseline failed: {done.stderr[-2000:]}", flush=True)
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"  {result['total_s']} s (forward {result['forward_s']} s, {quantizer} {result['quantize_s']} s)", flush=True
    )
    return result


def preflight(record: dict, ckpt_dir: Path, args) -> dict | None:
    """What the API's memory preflight estimated for this job (core.memory, as common.limits calls it)."""
    from core.memory import estimate_job_memory
    from core.model_dims import read_model_dims
    from core.models import ModelSource

    source = ModelSource(model_id=ckpt_dir.name, kind="hf_dir", path=ckpt_dir)
    estimate = estimate_job_memory(
        read_model_dims(source),
        method=record["method"],
        calibration_rows=record["rows"],
        max_tokens=record["max_tokens"],
        quantizer=record["quantizer"],
        source_bytes=2,
    )
    return {"total_bytes": estimate.total_bytes, "phase": estimate.phase, "phases": estimate.phases}


def complete(record: dict, checkpoint_bytes: int) -> dict:
    reported = (record.get("reported") or {}).get("peak_rss_bytes")
    sampled = (record.get("sampled") or {}).get("peak_rss_bytes") or None
    peak = reported or sampled
    record["peak_rss_bytes"] = peak
    record["peak_rss_source"] = "reported" if reported else ("sampled" if sampled else None)
    record["checkpoint_bytes"] = checkpoint_bytes
    record["rss_over_checkpoint"] = round(peak / checkpoint_bytes, 3) if peak else None
    return record


def table(results: dict) -> str:
    head = (
        ["shape", "quantizer", "rows×tokens", "status", "total wall s"]
        + [f"{s} s" for s in STAGES]
        + ["peak RSS GiB", "checkpoint GiB", "RSS/checkpoint", "preflight GiB", "baseline s", "job/baseline"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["jobs"]:
        t, ev = r.get("timings") or {}, r.get("event_timings") or {}
        rep, smp = (r.get("reported") or {}).get("peak_rss_bytes"), (r.get("sampled") or {}).get("peak_rss_bytes")
        rss = (
            f"{_gib(rep)} (s {_gib(smp)})" if rep and smp else _gib(rep) if rep else f"{_gib(smp)} (s)" if smp else "—"
        )
        ratio = "—" if r.get("rss_over_checkpoint") is None else f"{r['rss_over_checkpoint']:.2f}"
        lines.append(
            "| "
            + " | ".join(
                [r["shape"], r["quantizer"], f"{r['rows']}×{r['max_tokens']}", r["status"], _s(r.get("wall_s"))]
                + [_s(t[s]) if s in t else (_s(ev[s]) + "e" if s in ev else "—") for s in STAGES]
                + [
                    rss,
                    _gib(r["checkpoint_bytes"]),
                    ratio,
                    _gib((r.get("preflight") or {}).get("total_bytes")),
                    _s(((results.get("baselines") or {}).get(r["quantizer"]) or {}).get("total_s")),
                    "—" if r.get("job_over_baseline") is None else f"{r['job_over_baseline']:.2f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def stage_rss_table(results: dict) -> str:
    lines = ["| shape | quantizer | source | " + " | ".join(STAGES) + " |", "|" + "---|" * (3 + len(STAGES))]
    for r in results["jobs"]:
        for source in ("reported", "sampled"):
            by = (r.get(source) or {}).get("peak_rss_by_stage")
            if by:
                lines.append(
                    f"| {r['shape']} | {r['quantizer']} | {source} | "
                    + " | ".join(_gib(by.get(s)) for s in STAGES)
                    + " |"
                )
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m = results["machine"]
    return "\n".join(
        [
            f"## Scale benchmark: {results['checkpoint']['name']} ({results['started_at']})",
            "",
            "```sh",
            results["command"],
            "```",
            "",
            f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_bytes'] / GiB:.1f} GiB RAM, "
            f"torch threads {m['torch_threads_worker_env']}; "
            f"`TAQ_WORKER_MEMORY_BYTES` = {results['service']['worker_memory_bytes']}. "
            f"Checkpoint: {results['checkpoint']['parameters'] / 1e6:,.1f} M parameters, "
            f"{results['checkpoint']['num_shards']} bf16 shards (bench/scale_models.py, seed "
            f"{results['checkpoint'].get('seed')}).",
            "",
            table(results),
            "",
            "Wall times in seconds: total = submit → final state seen by the client; stages = the job's "
            "`result.timings`, or with `e` from the job's stage events (publish always: `result.timings` is "
            "written during publish). Peak RSS: the worker's report (`result.resources`) with, in parentheses, the "
            "peak VmRSS sampled from /proc every 0.5 s; `(s)` alone = sampled only. Preflight: the API's memory "
            "estimate for the job (core.memory). Baseline: bench/scale_baseline.py in the same run before the service "
            "started, with the worker's allocator settings unless `--baseline-allocator` says otherwise — one "
            "streamed forward pass over the calibration rows plus the job's quantizer over every layer "
            "at 4 bits; job/baseline = the sum of the job's stage times over it.",
            "",
            "Peak RSS per stage (GiB):",
            "",
            stage_rss_table(results),
            "",
        ]
    )


# ---- commands ---------------------------------------------------------------------------------
def cmd_write(args) -> int:
    write_checkpoint(args.shape, args.out, seed=args.seed, max_shard_bytes=args.max_shard_bytes)
    return 0


def _interrupt(*_) -> None:
    raise KeyboardInterrupt  # SIGTERM to the benchmark: stop the service as Ctrl-C does


def cmd_run(args) -> int:
    import httpx

    started = datetime.now(UTC)
    ckpt = write_checkpoint(args.shape, args.out, seed=args.seed, max_shard_bytes=args.max_shard_bytes)
    ckpt_dir = Path(ckpt["path"])
    ckpt["config"] = json.loads((ckpt_dir / "config.json").read_text())
    checkpoint_bytes = sum(p.stat().st_size for p in ckpt_dir.glob("*.safetensors"))
    run_dir = (args.out / f"run-{started:%Y%m%d-%H%M%S}").resolve()
    service = Service(run_dir, Path(args.out).resolve(), int(args.worker_memory_gib * GiB))
    lines = [line for line in CALIBRATION.read_text().splitlines() if line.strip()][: args.rows]
    if len(lines) < args.rows:
        print(f"note: {CALIBRATION} has only {len(lines)} rows", flush=True)
    results = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "argv": sys.argv,
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine(service.env),
        "service": {
            "command": service.command,
            "data_dir": str(service.data_dir),
            "log": str(service.log_path),
            "worker_memory_bytes": int(args.worker_memory_gib * GiB),
            "env": {k: v for k, v in service.env.items() if k.startswith("TAQ_") or k == "PYTHONPATH"},
        },
        "checkpoint": {**ckpt, "size_on_disk_bytes": checkpoint_bytes},
        "dataset": {"source": str(CALIBRATION.relative_to(ROOT)), "rows": len(lines)},
        "jobs": [],
    }
    sampler = RssSampler(0)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        m = results["machine"]
        print(
            f"machine: {m['nproc']} CPUs, {m['mem_total_bytes'] / GiB:.1f} GiB RAM, torch threads "
            f"{m['torch_threads_worker_env']}; checkpoint {checkpoint_bytes / GiB:.2f} GiB",
            flush=True,
        )
        # per quantizer and allocator setting; the first setting's is the one job/baseline uses
        variants = {
            q: {a: time_baseline(args, ckpt["name"], service.env, q, a) for a in args.baseline_allocator}
            for q in ([] if args.no_baseline else args.quantizer)
        }
        results["baseline_allocators"] = variants
        results["baselines"] = {q: by[args.baseline_allocator[0]] for q, by in variants.items()}
        print(f"starting {shlex.join(service.command)} (data dir {service.data_dir})", flush=True)
        service.start()
        sampler.serve_pid = service.proc.pid
        sampler.start()
        print(f"ready at {service.url}; worker pid {service.worker_pid}", flush=True)
        with httpx.Client(base_url=service.url, timeout=120) as client:
            r = client.post(
                "/v1/datasets",
                files={
                    "file": (
                        f"capitals-first{len(lines)}.jsonl",
                        ("\n".join(lines) + "\n").encode(),
                        "application/jsonl",
                    )
                },
                headers={"Idempotency-Key": f"bench-scale-ds-{len(lines)}"},
            )
            if r.status_code >= 400:
                raise RuntimeError(f"dataset upload refused: {json.dumps(envelope(r))}")
            results["dataset"]["id"] = r.json()["id"]
            for quantizer in args.quantizer:
                spec = {
                    "model": ckpt["name"],
                    "method": args.method,
                    "calibration_dataset_id": r.json()["id"],
                    "bit_budget": {"avg_bits": args.budget},
                    "bit_choices": [4, 8, 16],
                    "group_size": 128,
                    "exports": ["hf", "gguf"],
                    "max_calibration_rows": args.rows,
                    "max_tokens": args.max_tokens,
                    "quantizer": quantizer,
                    "seed": 0,
                }
                print(f"{ckpt['name']} {args.method}+{quantizer}: submitting", flush=True)
                record = run_job(
                    client,
                    sampler,
                    spec,
                    f"bench-scale-{run_dir.name}-{quantizer}",
                    poll=1.0,
                    every=args.progress_every,
                    timeout=args.job_timeout,
                )
                record = complete(
                    {
                        "shape": args.shape,
                        "quantizer": quantizer,
                        "method": args.method,
                        "budget": args.budget,
                        "rows": len(lines),
                        "max_tokens": args.max_tokens,
                        **record,
                        "spec": spec,
                    },
                    checkpoint_bytes,
                )
                record["preflight"] = preflight(record, ckpt_dir, args)
                base = results["baselines"].get(quantizer)
                job_s = sum((record.get("timings") or {}).values()) or None
                record["job_s"] = job_s
                record["job_over_baseline"] = round(job_s / base["total_s"], 2) if base and job_s else None
                record["job_over_baseline_by_allocator"] = {
                    a: round(job_s / b["total_s"], 2)
                    for a, b in results["baseline_allocators"].get(quantizer, {}).items()
                    if b and job_s
                }
                results["jobs"].append(record)
                rep = (record.get("reported") or {}).get("peak_rss_bytes")
                smp = (record.get("sampled") or {}).get("peak_rss_bytes")
                print(
                    f"  {record['status']} in {record['wall_s']} s; peak RSS reported {_gib(rep)} GiB, "
                    f"sampled {_gib(smp)} GiB (VmHWM {_gib((record.get('sampled') or {}).get('vmhwm_bytes'))}); "
                    f"artifacts {_gib(record['artifacts_total_bytes'])} GiB",
                    flush=True,
                )
    except KeyboardInterrupt:
        print("interrupted: stopping the service", flush=True)
        results["interrupted"] = True
    finally:
        sampler.stopped.set()
        service.stop()
        signal.signal(signal.SIGTERM, previous)
        results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        if not args.keep_artifacts and (service.data_dir / "objects").exists():
            shutil.rmtree(service.data_dir / "objects", ignore_errors=True)
            results["service"]["artifacts_deleted"] = True
        print("\n" + table(results) + "\n\n" + stage_rss_table(results), flush=True)
        for path, text in ((args.json, json.dumps(results, indent=2) + "\n"), (args.markdown, markdown(results))):
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path}", flush=True)
    return 0 if results["jobs"] and all(j["status"] == "succeeded" for j in results["jobs"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("write", "run"):
        p = sub.add_parser(name)
        p.add_argument("--shape", choices=sorted(SHAPES), required=True)
        p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "scale", help="checkpoint root")
        p.add_argument("--seed", type=int, default=0, help="weight generator seed")
        p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    run = sub.choices["run"]
    run.add_argument("--quantizer", nargs="+", choices=["rtn", "gptq"], default=["rtn", "gptq"])
    run.add_argument("--method", default="taq", choices=["taq", "taq_kl", "taqo", "uniform"])
    run.add_argument("--rows", type=int, default=8, help="calibration rows (first N of capitals)")
    run.add_argument("--max-tokens", type=int, default=128)
    run.add_argument("--budget", type=float, default=4.5, help="bit_budget.avg_bits")
    run.add_argument("--worker-memory-gib", type=float, default=20.0, help="TAQ_WORKER_MEMORY_BYTES in GiB")
    run.add_argument("--job-timeout", type=float, default=24 * 3600, help="cancel a job after this many s")
    run.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    run.add_argument("--keep-artifacts", action="store_true", help="keep <run dir>/data/objects")
    run.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the streamed forward + quantizer baseline (bench/scale_baseline.py)",
    )
    run.add_argument(
        "--baseline-allocator",
        nargs="+",
        choices=["worker", "default"],
        default=["worker"],
        help="allocator settings of the baseline (scale_baseline.py --allocator); one baseline per "
        "setting, the first is the one job/baseline uses (worker: the job's own)",
    )
    run.add_argument("--json", type=Path)
    run.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    return cmd_write(args) if args.command == "write" else cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
