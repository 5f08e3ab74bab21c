"""Job commands of the HTTP client: ``taq submit``, ``status``, ``list``, ``wait``, ``cancel``,
``events``, ``delete``.

They talk to a running service at ``--url`` (env ``TAQ_URL``, default http://127.0.0.1:8000) with
``--api-key`` (env ``TAQ_API_KEY``, sent as ``Authorization: Bearer <key>``). Every read command
takes ``--json`` to print the server's JSON instead of a table. Exit codes: cli/client.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich import box
from rich.table import Column, Table

from cli.app import app
from cli.client import (
    DEFAULT_URL,
    EXIT_USAGE,
    ApiKey,
    Client,
    JobArg,
    JsonOut,
    PageCursor,
    PageLimit,
    Url,
    err,
    fail,
    finish,
    out,
    page_params,
    print_json,
    print_next_cursor,
    read_json_file,
    upload_file,
    wait_job,
)
from common.job_status import FINISHED_STATUSES


def _group_sizes_by_bits(pairs: list[str]) -> dict[str, int]:
    """["8=128", "4=32"] -> {"8": 128, "4": 32}; a usage error names the bad pair."""
    out: dict[str, int] = {}
    for pair in pairs:
        bits, _, size = pair.partition("=")
        if not (bits.strip().isdigit() and size.strip().isdigit()):
            fail(EXIT_USAGE, f"--group-size-at takes BITS=SIZE, e.g. 8=128; got {pair!r}")
        out[bits.strip()] = int(size)
    return out


# ---- commands --------------------------------------------------------------------------------
@app.command(rich_help_panel="Client")
def submit(
    model: Annotated[str | None, typer.Option(help="model id (see `taq models`)")] = None,
    method: Annotated[str | None, typer.Option(help="taq | taqo | taqo_gen | taq_kl | taq_grad | uniform")] = None,
    calibration: Annotated[Path | None, typer.Option(help="calibration JSONL; uploaded first")] = None,
    avg_bits: Annotated[
        list[float] | None, typer.Option("--avg-bits", help="bit budget; repeat for a budget sweep")
    ] = None,
    bit_choices: Annotated[str | None, typer.Option(help="comma-separated, e.g. 4,8,16")] = None,
    group_size: Annotated[int | None, typer.Option()] = None,
    group_size_at: Annotated[
        list[str] | None,
        typer.Option(
            "--group-size-at",
            help="BITS=SIZE: that width in groups of its own size, e.g. 8=128; repeatable",
        ),
    ] = None,
    symmetric: Annotated[bool | None, typer.Option("--symmetric/--asymmetric", show_default=False)] = None,
    zero_point: Annotated[
        str | None,
        typer.Option(help="integer | float: float stores an fp16 offset per group (<= 5 bits; GGUF Q4_1/Q5_1 only)"),
    ] = None,
    k_quants: Annotated[
        bool | None,
        typer.Option(
            "--k-quants/--no-k-quants",
            show_default=False,
            help="groups of 32, linears with 256 | in: 4/5-bit as GGUF Q4_K/Q5_K (--zero-point float), "
            "6-bit as Q6_K (--symmetric)",
        ),
    ] = None,
    allocation: Annotated[str | None, typer.Option(help="budget | paper | error_only | random")] = None,
    allocation_unit: Annotated[str | None, typer.Option(help="layer | linear")] = None,
    quantizer: Annotated[str | None, typer.Option(help="rtn | gptq (gptq needs calibration data)")] = None,
    clip_search: Annotated[bool | None, typer.Option("--clip-search/--no-clip-search", show_default=False)] = None,
    calibration_inputs: Annotated[
        str | None,
        typer.Option(help="fp | quantized: calibrate each layer on full-precision or already-quantized inputs"),
    ] = None,
    closed_loop: Annotated[
        bool | None,
        typer.Option(
            "--closed-loop/--no-closed-loop",
            show_default=False,
            help="measure the allocation against uniform and error_only on held-back rows; ship the best",
        ),
    ] = None,
    export: Annotated[list[str] | None, typer.Option("--export", help="hf | gguf; repeatable")] = None,
    target_runtime: Annotated[
        str | None,
        typer.Option(
            help="vllm | llama.cpp | transformers: refuse a menu it cannot load, write the layout it reads "
            "(default export: its format)"
        ),
    ] = None,
    eval_file: Annotated[Path | None, typer.Option("--eval", help="eval JSONL; uploaded first")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    worker_class: Annotated[
        str | None,
        typer.Option("--worker-class", help="run on this worker class only (default: the smallest that holds the job)"),
    ] = None,
    spec_file: Annotated[
        Path | None, typer.Option("--spec", help="a whole job spec (JSON); options override it")
    ] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Idempotency-Key header")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job with a progress bar until it finishes")] = False,
    timeout: Annotated[float | None, typer.Option(help="with --wait: give up after this many seconds")] = None,
    interval: Annotated[float, typer.Option(help="with --wait: poll interval (s)")] = 1.0,
    as_json: JsonOut = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Submit a quantization job and print its id (--wait: follow it to the end)."""
    spec: dict[str, Any] = {}
    if spec_file is not None:
        spec = read_json_file(spec_file, "spec")
        if not isinstance(spec, dict):
            fail(EXIT_USAGE, f"spec {spec_file} must be a JSON object")
    if bit_choices is not None:
        try:
            spec["bit_choices"] = [int(b) for b in bit_choices.replace(" ", "").split(",") if b]
        except ValueError:
            fail(EXIT_USAGE, f"--bit-choices must be comma-separated integers, got {bit_choices!r}")
    if group_size_at:
        spec["group_size_by_bits"] = _group_sizes_by_bits(group_size_at)
    for key, value in (
        ("model", model),
        ("method", method),
        ("group_size", group_size),
        ("symmetric", symmetric),
        ("zero_point", zero_point),
        ("k_quants", k_quants),
        ("allocation", allocation),
        ("allocation_unit", allocation_unit),
        ("quantizer", quantizer),
        ("clip_search", clip_search),
        ("calibration_inputs", calibration_inputs),
        ("closed_loop", closed_loop),
        ("target_runtime", target_runtime),
        ("seed", seed),
        ("worker_class", worker_class),
    ):
        if value is not None:
            spec[key] = value
    if avg_bits:
        spec["bit_budget"] = {"avg_bits": avg_bits[0] if len(avg_bits) == 1 else list(avg_bits)}
    if export:
        spec["exports"] = list(export)
    if not spec.get("model"):
        fail(EXIT_USAGE, 'a model is required: --model ID or a --spec file with "model"')
    client = Client(url, api_key)
    if calibration is not None:
        spec["calibration_dataset_id"] = upload_file(client, calibration)["id"]
        spec.pop("calibration", None)
    if eval_file is not None:
        spec["eval_dataset_id"] = upload_file(client, eval_file)["id"]
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    job = client.json("POST", "/v1/jobs", json=spec, headers=headers)
    if not wait:
        if as_json:
            print_json(job)
        else:
            out.print(job["id"], highlight=False)
        return
    if not as_json:
        err.print(f"submitted {job['id']}", highlight=False)
    finish(wait_job(client, job["id"], timeout, interval, show=True), as_json)


@app.command(rich_help_panel="Client")
def status(
    job_id: JobArg,
    as_json: JsonOut = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Show one job."""
    job = Client(url, api_key).json("GET", f"/v1/jobs/{job_id}")
    if as_json:
        return print_json(job)
    table = Table(show_header=False, box=None)
    spec = job.get("spec") or {}
    rows = [
        ("id", job["id"]),
        ("status", job["status"]),
        ("stage", job.get("stage") or "-"),
        ("progress", f"{(job.get('progress') or 0) * 100:.0f}%"),
        ("model", spec.get("model")),
        ("method", spec.get("method")),
        ("worker class", job.get("worker_class") or "-"),
        ("created", job.get("created_at")),
        ("started", job.get("started_at") or "-"),
        ("finished", job.get("finished_at") or "-"),
    ]
    if job.get("error"):
        rows.append(("error", f"{job['error'].get('code')}: {job['error'].get('message')}"))
    for budget in (job.get("result") or {}).get("budgets") or []:
        rows.append(("effective bits", f"{budget.get('effective_bits')} (budget {budget.get('avg_bits', '-')})"))
        loop = budget.get("closed_loop")
        if loop:
            measured = ", ".join(
                f"{c['name']} {c['measured_gold_nll']:.4f}"
                + (f" (contains {c['calibration_contains']:.2f})" if c.get("calibration_contains") is not None else "")
                + (" answers fewer" if c.get("answers_fewer") else "")
                for c in loop["candidates"]
            )
            rows.append(
                (
                    "closed loop",
                    f"shipped {loop['shipped']}; held-back gold NLL ({loop['holdout_rows']} rows): {measured}",
                )
            )
    for key, value in rows:
        table.add_row(f"[bold]{key}", str(value))
    out.print(table)
    if job["status"] == "succeeded" and (job.get("result") or {}).get("metrics"):
        from cli.tables import eval_tables

        report = _json_artifact(Client(url, api_key), job_id, "eval.json")
        for evaluation in eval_tables(report, job.get("result")) if report else []:
            out.print(evaluation)


def _json_artifact(client: Client, job_id: str, name: str) -> Any:
    """A JSON artifact of the job, or None when the job has none by that name."""
    listing = client.json("GET", f"/v1/jobs/{job_id}/artifacts")
    if not any(a["name"] == name for a in listing):
        return None
    return client.request("GET", f"/v1/jobs/{job_id}/artifacts/{name}").json()


@app.command("list", rich_help_panel="Client")
def list_cmd(
    status_filter: Annotated[
        list[str] | None, typer.Option("--status", help="queued | running | succeeded | failed | cancelled; repeatable")
    ] = None,
    limit: PageLimit = None,
    cursor: PageCursor = None,
    as_json: JsonOut = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List jobs, newest first."""
    params = {"status": status_filter or [], **page_params(limit, cursor)}
    page = Client(url, api_key).json("GET", "/v1/jobs", params=params)
    if as_json:
        return print_json(page)
    table = Table(Column("id", no_wrap=True), "status", "stage", "model", "method", box=box.SIMPLE_HEAD, pad_edge=False)
    for job in page["items"]:
        spec = job.get("spec") or {}
        state = job["status"] + (f" {(job.get('progress') or 0) * 100:.0f}%" if job["status"] == "running" else "")
        table.add_row(job["id"], state, job.get("stage") or "-", str(spec.get("model")), str(spec.get("method")))
    out.print(table)
    print_next_cursor(page)


@app.command(rich_help_panel="Client")
def wait(
    job_id: JobArg,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds (exit 5)")] = None,
    interval: Annotated[float, typer.Option(help="poll interval (s)")] = 1.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    as_json: JsonOut = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Wait for a job to finish; exit 1 when it failed or was cancelled."""
    finish(wait_job(Client(url, api_key), job_id, timeout, interval, show=not quiet), as_json)


@app.command(rich_help_panel="Client")
def cancel(
    job_id: JobArg,
    as_json: JsonOut = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Cancel a job (a running one stops between layers)."""
    job = Client(url, api_key).json("POST", f"/v1/jobs/{job_id}/cancel")
    if as_json:
        return print_json(job)
    state = "cancelled" if job["status"] == "cancelled" else "cancel requested"
    out.print(f"{job['id']} {state}", highlight=False)


def _event_line(event: dict) -> str:
    parts = [str(event.get("id", "")), str(event.get("created_at", "")), event.get("kind") or ""]
    for key in ("status", "stage"):
        if event.get(key):
            parts.append(f"{key}={event[key]}")
    if event.get("progress") is not None:
        parts.append(f"progress={event['progress'] * 100:.0f}%")
    if event.get("message"):
        parts.append(event["message"])
    return "  ".join(parts)


def _emit_event(event: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(event, default=str) + "\n")
        sys.stdout.flush()
    else:
        out.print(_event_line(event), markup=False, highlight=False)


def _follow_sse(client: Client, job_id: str, as_json: bool, after: int = 0) -> bool:
    """Stream events after id ``after``; False when the server did not answer an event stream
    (caller polls)."""
    last_id = after
    while True:
        headers = {"Accept": "text/event-stream"}
        if last_id:
            headers["Last-Event-ID"] = str(last_id)
        try:
            with client.stream(
                "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(60.0, read=120.0)
            ) as response:
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    return False
                kind, data = "message", []
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif line == "" and data:
                        payload = json.loads("\n".join(data))
                        if kind == "end":
                            return True
                        if kind != "timeout":
                            last_id = payload.get("id", last_id)
                            _emit_event(payload, as_json)
                        kind, data = "message", []
                    elif line == "":
                        kind = "message"
        except (httpx.TransportError, ValueError):
            time.sleep(1)  # dropped stream: resume from Last-Event-ID


def _follow_poll(client: Client, job_id: str, as_json: bool, interval: float, after: int = 0) -> None:
    while True:
        events = client.json("GET", f"/v1/jobs/{job_id}/events", params={"after": after})
        for event in events:
            after = event["id"]
            _emit_event(event, as_json)
        if not events and client.json("GET", f"/v1/jobs/{job_id}")["status"] in FINISHED_STATUSES:
            return
        if not events:
            time.sleep(interval)


@app.command(rich_help_panel="Client")
def events(
    job_id: JobArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job finishes")] = False,
    poll: Annotated[bool, typer.Option("--poll", help="with --follow: poll instead of server-sent events")] = False,
    after: Annotated[int, typer.Option(min=0, help="only events after this id")] = 0,
    as_json: JsonOut = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Show a job's progress events (--json: a list; with --follow, one JSON object a line)."""
    client = Client(url, api_key)
    if follow:
        if poll or not _follow_sse(client, job_id, as_json, after):
            _follow_poll(client, job_id, as_json, 1.0, after)
        return
    items = client.json("GET", f"/v1/jobs/{job_id}/events", params={"after": after})
    if as_json:
        return print_json(items)
    for event in items:
        _emit_event(event, False)


@app.command(rich_help_panel="Client")
def delete(job_id: JobArg, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Delete a finished job and its artifacts (a queued or running job: cancel it first)."""
    Client(url, api_key).request("DELETE", f"/v1/jobs/{job_id}")
    out.print(f"{job_id} deleted", highlight=False)
