"""Load on the hot read path: `taq api` on PostgreSQL against a bare FastAPI + SQLAlchemy app
reading the same row, in the same run, with wrk (loopback only, bounded duration).

    python bench/bench_api.py --clients 64 --duration 15 [--rounds 2] [--json bench/out/api.json]

Both servers run one process with 40 pooled connections and 40 threads; `taq api` runs as deployed
(structured access log at INFO, auth with a database key, rate limit off: 64 clients on one key
would otherwise be refused by design). Per round and server: requests/s, p50/p99 latency, non-2xx
responses and socket timeouts (wrk --timeout 2s), then the ratio taq/bare. Target (issue 15): 0
non-2xx, 0 timeouts, ratio >= 0.5 and p99 <= 50 ms at 64 clients on an otherwise idle 2-core box.
Needs `wrk` (apt-get install wrk) and the PostgreSQL of the test setup.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.local_stack import free_port, stop_all, temporary_database, write_summary  # noqa: E402


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} not ready after {timeout}s")


def parse_wrk(output: str) -> dict:
    def unit_ms(value: str) -> float:
        number, unit = re.match(r"([\d.]+)(us|ms|s)", value).groups()
        return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    total = int(re.search(r"(\d+) requests in", output).group(1))
    p50 = unit_ms(re.search(r"\s50%\s+([\d.]+\w+)", output).group(1))
    p99 = unit_ms(re.search(r"\s99%\s+([\d.]+\w+)", output).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "requests_per_s": rps,
        "requests": total,
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "timeouts": int(errors.group(4)) if errors else 0,
        "socket_errors": sum(int(g) for g in errors.groups()[:3]) if errors else 0,
    }


def wrk(url: str, clients: int, duration: int, headers: dict[str, str]) -> dict:
    cmd = ["wrk", "-t2", f"-c{clients}", f"-d{duration}s", "--timeout", "2s", "--latency"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    return parse_wrk(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    procs: list[subprocess.Popen] = []
    with temporary_database("taq_bench") as (_db, url):
        try:
            _run(args, work, url, procs)
        finally:
            stop_all(procs, grace=20)
            shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path, url: str, procs: list[subprocess.Popen]) -> None:
    from common.auth import create_key
    from common.db import migrate, session_scope
    from common.ids import new_id
    from common.job_status import JobStatus
    from common.orm import Job, utcnow
    from common.settings import Settings
    from core.spec import JobSpec

    settings = Settings(data_dir=work, database_url=url)
    migrate(settings)
    spec = JobSpec(model="smollm2-135m-instruct", method="uniform", bit_budget={"avg_bits": 5.0})
    with session_scope(settings) as session:
        key = create_key(session, "bench").key
        job_id = new_id("job")
        now = utcnow()
        session.add(
            Job(
                id=job_id,
                tenant="bench",
                status=JobStatus.running,
                stage="score",
                progress=0.4,
                spec=spec.model_dump(mode="json"),
                created_at=now,
                updated_at=now,
                attempts=1,
                cancel_requested=False,
                worker_class="default",
            )
        )
    taq_port, bare_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TAQ_")},
        "TAQ_DATA_DIR": str(work),
        "TAQ_DATABASE_URL": url,
        "TAQ_RATE_LIMIT_PER_SECOND": "0",
        "TAQ_LOG_LEVEL": "INFO",
    }
    taq = str(Path(sys.executable).with_name("taq"))
    with open(work / "taq.log", "wb") as log:
        procs.append(
            subprocess.Popen(
                [taq, "api", "--port", str(taq_port), "--skip-migrate"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    procs.append(
        subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "bare_api.py"), "--port", str(bare_port), "--database-url", url],
            start_new_session=True,
        )
    )
    targets = {
        "taq": (f"http://127.0.0.1:{taq_port}/v1/jobs/{job_id}", {"Authorization": f"Bearer {key}"}),
        "bare": (f"http://127.0.0.1:{bare_port}/jobs/{job_id}", {}),
    }
    for (target, headers), proc in zip(targets.values(), procs):
        wait_ready(target, proc)
        httpx.get(target, headers=headers).raise_for_status()
        wrk(target, args.clients, 2, headers)  # warm-up: pools, JIT-free but caches and threads
    rounds = []
    for number in range(args.rounds):
        result = {
            name: wrk(target, args.clients, args.duration, headers) for name, (target, headers) in targets.items()
        }
        result["ratio"] = round(result["taq"]["requests_per_s"] / result["bare"]["requests_per_s"], 3)
        rounds.append(result)
        print(json.dumps({"round": number + 1, **result}), flush=True)
    summary = {
        "clients": args.clients,
        "duration_s": args.duration,
        "rounds": rounds,
        "min_ratio": min(r["ratio"] for r in rounds),
        "max_p99_ms_taq": max(r["taq"]["p99_ms"] for r in rounds),
        "non_2xx_taq": sum(r["taq"]["non_2xx"] for r in rounds),
        "timeouts_taq": sum(r["taq"]["timeouts"] for r in rounds),
        "command": " ".join(["python"] + sys.argv),
    }
    write_summary(summary, args.json)


if __name__ == "__main__":
    main()
