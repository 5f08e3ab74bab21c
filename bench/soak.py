"""Soak: minutes of mixed traffic from three tenants on PostgreSQL + Redis with one worker —
submits, polls, event streams, artifact downloads — then: 5xx count, open database connections
over time, and whether every job finished.

    python bench/soak.py --minutes 10 [--json bench/out/soak.json]

The jobs are `uniform` RTN jobs on a tiny seeded random Llama (SmolLM2's tokenizer, 4 layers), so
the worker keeps up; the point is the service under sustained use, not quantization speed.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.local_stack import PG_ADMIN_DSN, free_port, stop_all, temporary_database, write_summary  # noqa: E402

REDIS = os.environ.get("TAQ_TEST_REDIS", "redis://127.0.0.1:6379")
SPEC = {
    "model": "tiny-llama",
    "method": "uniform",
    "bit_budget": {"avg_bits": 6.0},
    "bit_choices": [4, 8],
    "group_size": 32,
    "exports": ["hf"],
    "max_tokens": 32,
}


def tiny_model(root: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from core.packaged_models import require_smollm2

    gguf = require_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    out = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


class Traffic:
    def __init__(self, base: str, keys: list[str], deadline: float) -> None:
        self.base, self.keys, self.deadline = base, keys, deadline
        self.statuses: collections.Counter[int] = collections.Counter()
        self.errors: list[str] = []
        self.jobs: list[tuple[str, str]] = []  # (key, job id)
        self.lock = threading.Lock()

    def record(self, response: httpx.Response) -> httpx.Response:
        with self.lock:
            self.statuses[response.status_code] += 1
            if response.status_code >= 500:
                self.errors.append(
                    f"{response.request.method} {response.request.url.path}: "
                    f"{response.status_code} {response.text[:200]}"
                )
        return response

    def tenant(self, key: str, seed: int) -> None:
        rng = random.Random(seed)
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=30) as client:
            mine: list[str] = []
            next_submit = 0.0
            while time.monotonic() < self.deadline:
                try:
                    if time.monotonic() >= next_submit:
                        job = self.record(client.post("/v1/jobs", json={**SPEC, "seed": rng.randrange(1 << 30)}))
                        if job.status_code == 202:
                            mine.append(job.json()["id"])
                            with self.lock:
                                self.jobs.append((key, job.json()["id"]))
                        next_submit = time.monotonic() + rng.uniform(15, 30)
                    if not mine:
                        time.sleep(0.5)
                        continue
                    job_id = rng.choice(mine)
                    action = rng.random()
                    if action < 0.6:
                        self.record(client.get(f"/v1/jobs/{job_id}"))
                    elif action < 0.7:
                        self.record(client.get("/v1/jobs", params={"limit": 5}))
                    elif action < 0.85:
                        with client.stream(
                            "GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}
                        ) as stream:
                            self.record(stream)
                            started = time.monotonic()
                            for _ in stream.iter_lines():  # follow a while, then hang up
                                if time.monotonic() - started > rng.uniform(1, 8):
                                    break
                    else:
                        listing = self.record(client.get(f"/v1/jobs/{job_id}/artifacts"))
                        if listing.status_code == 200 and listing.json():
                            name = rng.choice([a["name"] for a in listing.json()])
                            self.record(client.get(f"/v1/jobs/{job_id}/artifacts/{name}"))
                    time.sleep(rng.uniform(0.05, 0.3))
                except httpx.HTTPError as exc:
                    with self.lock:
                        self.errors.append(f"client error: {type(exc).__name__}: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import redis

    redis_index = next(i for i in range(15, 1, -1) if redis.Redis.from_url(f"{REDIS}/{i}").dbsize() == 0)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    procs: list[subprocess.Popen] = []
    with temporary_database("taq_soak") as (db, url):
        try:
            _run(args, work, db, url, f"{REDIS}/{redis_index}", procs)
        finally:
            stop_all(procs, grace=60)
            redis.Redis.from_url(f"{REDIS}/{redis_index}").flushdb()
            shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path, db: str, url: str, broker_url: str, procs: list[subprocess.Popen]) -> None:
    import psycopg

    from common.auth import create_key
    from common.db import migrate, session_scope
    from common.settings import Settings

    (work / "models").mkdir()
    tiny_model(work / "models")
    settings = Settings(data_dir=work, database_url=url)
    migrate(settings)
    with session_scope(settings) as session:
        keys = [create_key(session, f"tenant-{i}").key for i in range(3)]
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TAQ_")},
        "TAQ_DATA_DIR": str(work),
        "TAQ_DATABASE_URL": url,
        "TAQ_BROKER_URL": broker_url,
        "TAQ_MODEL_ROOTS": str(work / "models"),
        "OMP_NUM_THREADS": "1",
        "TAQ_LOG_LEVEL": "WARNING",
    }
    taq = str(Path(sys.executable).with_name("taq"))
    for name, cmd in (
        ("api", [taq, "api", "--port", str(port), "--skip-migrate"]),
        ("worker", [taq, "worker", "--skip-migrate"]),
    ):
        with open(work / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    traffic = Traffic(base, keys, time.monotonic() + args.minutes * 60)
    threads = [threading.Thread(target=traffic.tenant, args=(key, i), daemon=True) for i, key in enumerate(keys)]
    for thread in threads:
        thread.start()
    connections = []
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        while any(t.is_alive() for t in threads):
            count = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (db,)).fetchone()[0]
            connections.append(count)
            time.sleep(10)
    # every submitted job must finish
    finished: dict[str, str] = {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(finished) < len(traffic.jobs):
        for key, job_id in traffic.jobs:
            if job_id not in finished:
                job = httpx.get(f"{base}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    finished[job_id] = job["status"]
        time.sleep(2)
    outcome = collections.Counter(finished.values())
    write_summary(
        {
            "minutes": args.minutes,
            "requests": sum(traffic.statuses.values()),
            "statuses": dict(sorted(traffic.statuses.items())),
            "server_errors": sum(n for code, n in traffic.statuses.items() if code >= 500),
            "client_errors_sample": traffic.errors[:5],
            "jobs_submitted": len(traffic.jobs),
            "jobs_finished": dict(outcome),
            "jobs_unfinished": len(traffic.jobs) - len(finished),
            "db_connections": {
                "first": connections[:1],
                "max": max(connections, default=0),
                "last": connections[-1:],
                "samples": connections,
            },
            "command": " ".join(["python"] + sys.argv),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
