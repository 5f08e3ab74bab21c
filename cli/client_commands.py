"""HTTP client commands: ``taq submit``, ``status``, ``list``, ``wait``, ``cancel``, ``events``,
``profile``, ``download``, ``models``.

They talk to a running service at ``--url`` (env ``TAQ_URL``, default http://127.0.0.1:8000) with
``--api-key`` (env ``TAQ_API_KEY``, sent as ``Authorization: Bearer <key>``). Every read command
takes ``--json`` to print the server's JSON instead of a table.

Exit codes:

* 0 ok
* 1 the job failed or was cancelled (``submit --wait``, ``wait``)
* 2 usage error (bad option, unreadable ``--spec`` / data file)
* 3 the server answered with an error (printed as ``error.code: message``)
* 4 the service could not be reached (connection error)
* 5 timeout (``wait --timeout`` elapsed, or a request timed out)
* 6 checksum mismatch (``download``)
* 7 the server refused the credentials (401/403: no, wrong or revoked API key)
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import httpx
import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from cli.app import app

(EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_SERVER, EXIT_CONNECTION, EXIT_TIMEOUT, EXIT_CHECKSUM,
 EXIT_AUTH) = range(8)
FINISHED = ("succeeded", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8000"

EXIT_CODES_HELP = ("Client exit codes: 0 ok, 1 job failed/cancelled, 2 usage error, 3 server error response "
                   "(printed as error.code: message), 4 connection error, 5 timeout, 6 checksum mismatch, "
                   "7 authentication refused (401/403: no, wrong or revoked API key). "
                   "Client commands use --url / TAQ_URL and --api-key / TAQ_API_KEY.")
app.info.epilog = EXIT_CODES_HELP

out = Console()
err = Console(stderr=True)

Url = Annotated[str, typer.Option("--url", envvar="TAQ_URL", help="service base URL")]
ApiKey = Annotated[Optional[str], typer.Option("--api-key", envvar="TAQ_API_KEY", show_default=False,
                                               help="API key (sent as Authorization: Bearer)")]
JsonOut = Annotated[bool, typer.Option("--json", help="print JSON")]


def _fail(code: int, message: str) -> NoReturn:
    err.print(message, markup=False, highlight=False)
    raise typer.Exit(code)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


class Client:
    """A thin httpx wrapper that turns every failure into a documented exit code."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 60.0) -> None:
        headers = {"User-Agent": "taq-cli"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, follow_redirects=True)

    def _transport_error(self, exc: Exception) -> NoReturn:
        if isinstance(exc, httpx.TimeoutException):
            _fail(EXIT_TIMEOUT, f"timeout talking to {self.url}: {exc or type(exc).__name__}")
        _fail(EXIT_CONNECTION, f"cannot reach {self.url}: {exc or type(exc).__name__}")

    @staticmethod
    def check(response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        try:
            response.read()
            info = response.json().get("error") or {}
            code, message = info.get("code", "error"), info.get("message", "")
            details = info.get("details")
        except Exception:
            code, message, details = f"http_{response.status_code}", response.text[:300], None
        text = f"{code}: {message}"
        if details:
            text += f"\n{json.dumps(details, default=str)}"
        if response.status_code in (401, 403):
            # a credentials problem is not a server fault: scripts can tell it apart (exit 7)
            _fail(EXIT_AUTH, text + "\n(pass --api-key KEY or set TAQ_API_KEY)")
        _fail(EXIT_SERVER, text)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self._transport_error(exc)
        return self.check(response)

    def json(self, method: str, path: str, **kwargs) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            _fail(EXIT_SERVER, f"invalid_response: {method} {path} did not answer JSON")

    def stream(self, method: str, path: str, **kwargs):
        """Context manager over a streamed response (errors mapped like ``request``)."""
        client = self

        class _Ctx:
            def __enter__(self):
                try:
                    self.cm = client.http.stream(method, path, **kwargs)
                    response = self.cm.__enter__()
                except httpx.HTTPError as exc:
                    client._transport_error(exc)
                try:
                    return client.check(response)
                except BaseException:
                    self.cm.__exit__(None, None, None)
                    raise

            def __exit__(self, *exc):
                return self.cm.__exit__(*exc)

        return _Ctx()


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        _fail(EXIT_USAGE, f"cannot read {what} {path}: {exc.strerror or exc}")
    except ValueError as exc:
        _fail(EXIT_USAGE, f"{what} {path} is not valid JSON: {exc}")


def _upload(client: Client, path: Path) -> dict:
    try:
        data = path.read_bytes()
    except OSError as exc:
        _fail(EXIT_USAGE, f"cannot read {path}: {exc.strerror or exc}")
    return client.json("POST", "/v1/datasets", files={"file": (path.name, data, "application/jsonl")})


# ---- waiting ---------------------------------------------------------------------------------
def _wait_job(client: Client, job_id: str, timeout: float | None, interval: float, show: bool) -> dict:
    deadline = None if timeout is None else time.monotonic() + timeout
    job = client.json("GET", f"/v1/jobs/{job_id}")
    progress = Progress(TextColumn("[bold]{task.fields[job]}"), TextColumn("{task.description}"), BarColumn(),
                        TaskProgressColumn(), TimeElapsedColumn(), console=err, disable=not show, transient=False)
    with progress:
        task = progress.add_task(job["status"], total=1.0, job=job_id)
        while True:
            label = job["status"] + (f" · {job['stage']}" if job.get("stage") else "")
            progress.update(task, completed=job.get("progress") or 0.0, description=label)
            if job["status"] in FINISHED:
                break
            if deadline is not None and time.monotonic() >= deadline:
                progress.stop()
                _fail(EXIT_TIMEOUT, f"timeout: job {job_id} still {job['status']} after {timeout:g}s")
            time.sleep(interval if deadline is None else max(0.05, min(interval, deadline - time.monotonic())))
            job = client.json("GET", f"/v1/jobs/{job_id}")
    return job


def _finish(job: dict, as_json: bool) -> NoReturn:
    if as_json:
        _print_json(job)
    if job["status"] == "succeeded":
        if not as_json:
            out.print(f"{job['id']} succeeded", highlight=False)
        raise typer.Exit(EXIT_OK)
    error = job.get("error") or {}
    why = f": {error.get('code')}: {error.get('message')}" if error else ""
    _fail(EXIT_JOB_FAILED, f"job {job['id']} {job['status']}{why}")


# ---- commands --------------------------------------------------------------------------------
@app.command(rich_help_panel="Client")
def submit(
    model: Annotated[Optional[str], typer.Option(help="model id (see `taq models`)")] = None,
    method: Annotated[Optional[str], typer.Option(help="taq | taqo | taq_kl | uniform")] = None,
    calibration: Annotated[Optional[Path], typer.Option(help="calibration JSONL; uploaded first")] = None,
    avg_bits: Annotated[Optional[list[float]], typer.Option(
        "--avg-bits", help="bit budget; repeat for a budget sweep")] = None,
    bit_choices: Annotated[Optional[str], typer.Option(help="comma-separated, e.g. 4,8,16")] = None,
    group_size: Annotated[Optional[int], typer.Option()] = None,
    symmetric: Annotated[Optional[bool], typer.Option("--symmetric/--asymmetric", show_default=False)] = None,
    allocation: Annotated[Optional[str], typer.Option(help="budget | paper | error_only | random")] = None,
    allocation_unit: Annotated[Optional[str], typer.Option(help="layer | linear")] = None,
    quantizer: Annotated[Optional[str], typer.Option(help="rtn | gptq (gptq needs calibration data)")] = None,
    clip_search: Annotated[Optional[bool], typer.Option("--clip-search/--no-clip-search", show_default=False)] = None,
    calibration_inputs: Annotated[Optional[str], typer.Option(
        help="fp | quantized: calibrate each layer on full-precision or already-quantized inputs")] = None,
    export: Annotated[Optional[list[str]], typer.Option("--export", help="hf | gguf; repeatable")] = None,
    eval_file: Annotated[Optional[Path], typer.Option("--eval", help="eval JSONL; uploaded first")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    worker_class: Annotated[Optional[str], typer.Option(
        "--worker-class", help="run on this worker class only (default: the smallest that holds the job)")] = None,
    spec_file: Annotated[Optional[Path], typer.Option("--spec", help="a whole job spec (JSON); options override it")] = None,
    idempotency_key: Annotated[Optional[str], typer.Option(help="Idempotency-Key header")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job with a progress bar until it finishes")] = False,
    timeout: Annotated[Optional[float], typer.Option(help="with --wait: give up after this many seconds")] = None,
    interval: Annotated[float, typer.Option(help="with --wait: poll interval (s)")] = 1.0,
    as_json: JsonOut = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Submit a quantization job and print its id (--wait: follow it to the end)."""
    spec: dict[str, Any] = {}
    if spec_file is not None:
        spec = _read_json_file(spec_file, "spec")
        if not isinstance(spec, dict):
            _fail(EXIT_USAGE, f"spec {spec_file} must be a JSON object")
    if bit_choices is not None:
        try:
            spec["bit_choices"] = [int(b) for b in bit_choices.replace(" ", "").split(",") if b]
        except ValueError:
            _fail(EXIT_USAGE, f"--bit-choices must be comma-separated integers, got {bit_choices!r}")
    for key, value in (("model", model), ("method", method), ("group_size", group_size), ("symmetric", symmetric),
                       ("allocation", allocation), ("allocation_unit", allocation_unit), ("quantizer", quantizer),
                       ("clip_search", clip_search), ("calibration_inputs", calibration_inputs), ("seed", seed),
                       ("worker_class", worker_class)):
        if value is not None:
            spec[key] = value
    if avg_bits:
        spec["bit_budget"] = {"avg_bits": avg_bits[0] if len(avg_bits) == 1 else list(avg_bits)}
    if export:
        spec["exports"] = list(export)
    if not spec.get("model"):
        _fail(EXIT_USAGE, "a model is required: --model ID or a --spec file with \"model\"")
    client = Client(url, api_key)
    if calibration is not None:
        spec["calibration_dataset_id"] = _upload(client, calibration)["id"]
        spec.pop("calibration", None)
    if eval_file is not None:
        spec["eval_dataset_id"] = _upload(client, eval_file)["id"]
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    job = client.json("POST", "/v1/jobs", json=spec, headers=headers)
    if not wait:
        if as_json:
            _print_json(job)
        else:
            out.print(job["id"], highlight=False)
        return
    if not as_json:
        err.print(f"submitted {job['id']}", highlight=False)
    _finish(_wait_job(client, job["id"], timeout, interval, show=True), as_json)


@app.command(rich_help_panel="Client")
def status(job_id: Annotated[str, typer.Argument(metavar="JOB")], as_json: JsonOut = False,
           url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Show one job."""
    job = Client(url, api_key).json("GET", f"/v1/jobs/{job_id}")
    if as_json:
        return _print_json(job)
    table = Table(show_header=False, box=None)
    spec = job.get("spec") or {}
    rows = [("id", job["id"]), ("status", job["status"]), ("stage", job.get("stage") or "-"),
            ("progress", f"{(job.get('progress') or 0) * 100:.0f}%"), ("model", spec.get("model")),
            ("method", spec.get("method")), ("worker class", job.get("worker_class") or "-"),
            ("created", job.get("created_at")),
            ("started", job.get("started_at") or "-"), ("finished", job.get("finished_at") or "-")]
    if job.get("error"):
        rows.append(("error", f"{job['error'].get('code')}: {job['error'].get('message')}"))
    for budget in (job.get("result") or {}).get("budgets") or []:
        rows.append(("effective bits", f"{budget.get('effective_bits')} (budget {budget.get('avg_bits', '-')})"))
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
def list_cmd(status_filter: Annotated[Optional[list[str]], typer.Option(
                 "--status", help="queued | running | succeeded | failed | cancelled; repeatable")] = None,
             limit: Annotated[Optional[int], typer.Option(min=1)] = None,
             cursor: Annotated[Optional[str], typer.Option(help="next_cursor of a previous page")] = None,
             as_json: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List jobs, newest first."""
    params: dict[str, Any] = {"status": status_filter or []}
    if limit is not None:
        params["limit"] = limit
    if cursor:
        params["cursor"] = cursor
    page = Client(url, api_key).json("GET", "/v1/jobs", params=params)
    if as_json:
        return _print_json(page)
    table = Table(Column("id", no_wrap=True), "status", "stage", "model", "method", box=box.SIMPLE_HEAD, pad_edge=False)
    for job in page["items"]:
        spec = job.get("spec") or {}
        state = job["status"] + (f" {(job.get('progress') or 0) * 100:.0f}%" if job["status"] == "running" else "")
        table.add_row(job["id"], state, job.get("stage") or "-", str(spec.get("model")), str(spec.get("method")))
    out.print(table)
    if page.get("next_cursor"):
        err.print(f"more: --cursor {page['next_cursor']}", highlight=False)


@app.command(rich_help_panel="Client")
def wait(job_id: Annotated[str, typer.Argument(metavar="JOB")],
         timeout: Annotated[Optional[float], typer.Option(help="give up after this many seconds (exit 5)")] = None,
         interval: Annotated[float, typer.Option(help="poll interval (s)")] = 1.0,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
         as_json: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Wait for a job to finish; exit 1 when it failed or was cancelled."""
    _finish(_wait_job(Client(url, api_key), job_id, timeout, interval, show=not quiet), as_json)


@app.command(rich_help_panel="Client")
def cancel(job_id: Annotated[str, typer.Argument(metavar="JOB")], as_json: JsonOut = False,
           url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Cancel a job (a running one stops between layers)."""
    job = Client(url, api_key).json("POST", f"/v1/jobs/{job_id}/cancel")
    if as_json:
        return _print_json(job)
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
            with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                               timeout=httpx.Timeout(60.0, read=120.0)) as response:
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
        if not events and client.json("GET", f"/v1/jobs/{job_id}")["status"] in FINISHED:
            return
        if not events:
            time.sleep(interval)


@app.command(rich_help_panel="Client")
def events(job_id: Annotated[str, typer.Argument(metavar="JOB")],
           follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job finishes")] = False,
           poll: Annotated[bool, typer.Option("--poll", help="with --follow: poll instead of server-sent events")] = False,
           after: Annotated[int, typer.Option(min=0, help="only events after this id")] = 0,
           as_json: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Show a job's progress events (--json: a list; with --follow, one JSON object a line)."""
    client = Client(url, api_key)
    if follow:
        if poll or not _follow_sse(client, job_id, as_json, after):
            _follow_poll(client, job_id, as_json, 1.0, after)
        return
    items = client.json("GET", f"/v1/jobs/{job_id}/events", params={"after": after})
    if as_json:
        return _print_json(items)
    for event in items:
        _emit_event(event, False)


def _write_file(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        _fail(EXIT_USAGE, f"cannot write {path}: {exc.strerror or exc}")


@app.command(rich_help_panel="Client")
def profile(job_id: Annotated[str, typer.Argument(metavar="JOB")],
            png: Annotated[Optional[Path], typer.Option("--png", help="save the profile plot to this file")] = None,
            as_json: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Show a job's per-layer sensitivity profile and chosen bits."""
    client = Client(url, api_key)
    if png is not None:
        _write_file(png, client.request("GET", f"/v1/jobs/{job_id}/profile", params={"format": "png"}).content)
        if not as_json:
            err.print(f"saved {png}", highlight=False)
    data = client.json("GET", f"/v1/jobs/{job_id}/profile")
    if as_json:
        return _print_json(data)
    from cli.tables import profile_table

    out.print(profile_table(data, client.json("GET", f"/v1/jobs/{job_id}").get("result")))


def _find_artifact(listing: list[dict], name: str) -> tuple[str, int, str]:
    """(download name, size, sha256) for ``name`` (an artifact, ``hf.tar``, or ``hf/file``)."""
    for art in listing:
        if art["name"] in (name, name.removesuffix(".tar")) and (art["name"] == name or art.get("kind") == "directory"):
            return art["name"], art["size"], art["sha256"]
        for entry in art.get("files") or []:
            if entry["name"] == name:
                return entry["name"], entry["size"], entry["sha256"]
    names = sorted(a["name"] for a in listing)
    _fail(EXIT_SERVER, f"artifact_not_found: no artifact '{name}'; available: {', '.join(names) or 'none'}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@app.command(rich_help_panel="Client")
def download(job_id: Annotated[str, typer.Argument(metavar="JOB")],
             name: Annotated[str, typer.Argument(help="artifact name (e.g. model.gguf, hf, hf/config.json)")],
             output: Annotated[Optional[Path], typer.Option("-o", "--output", help="file to write")] = None,
             as_json: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Download an artifact, resuming a partial file (Range) and verifying its sha256 (exit 6 on mismatch)."""
    client = Client(url, api_key)
    listing = client.json("GET", f"/v1/jobs/{job_id}/artifacts")
    art_name, size, sha = _find_artifact(listing, name)
    is_dir = any(a["name"] == art_name and a.get("kind") == "directory" for a in listing)
    target = output or Path(Path(art_name).name + (".tar" if is_dir else ""))
    if target.is_dir():
        target = target / (Path(art_name).name + (".tar" if is_dir else ""))
    have = target.stat().st_size if target.is_file() else 0
    if have > size:
        have = 0
    resumed = 0
    try:
        if have < size or (have == size and _sha256_file(target) != sha):
            if have == size:
                have = 0
            headers = {"Range": f"bytes={have}-", "If-Range": f'"{sha}"'} if have else {}
            with client.stream("GET", f"/v1/jobs/{job_id}/artifacts/{art_name}", headers=headers,
                               timeout=httpx.Timeout(60.0, read=300.0)) as response:
                append = have > 0 and response.status_code == 206
                resumed = have if append else 0
                progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                    TimeElapsedColumn(), console=err, disable=as_json)
                with progress, target.open("ab" if append else "wb") as fh:
                    task = progress.add_task(target.name, total=size, completed=resumed)
                    for chunk in response.iter_bytes(1 << 20):
                        fh.write(chunk)
                        progress.advance(task, len(chunk))
        actual = _sha256_file(target)
    except OSError as exc:
        _fail(EXIT_USAGE, f"cannot write {target}: {exc.strerror or exc}")
    except httpx.HTTPError as exc:
        client._transport_error(exc)
    if actual != sha:
        try:
            target.unlink()
        except OSError:
            pass
        _fail(EXIT_CHECKSUM, f"checksum_mismatch: {target} has sha256 {actual}, the listing says {sha}; "
                             "the file was removed, download it again")
    info = {"name": art_name, "path": str(target), "size": target.stat().st_size, "sha256": actual,
            "resumed_from": resumed}
    if as_json:
        return _print_json(info)
    note = f" (resumed at byte {resumed})" if resumed else ""
    out.print(f"{target}  {info['size']} bytes  sha256 ok{note}", highlight=False)


@app.command(rich_help_panel="Client")
def models(as_json: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List the model ids the service can load."""
    items = Client(url, api_key).json("GET", "/v1/models")
    if as_json:
        return _print_json(items)
    keys = ["id"] + [k for k in ("kind", "weights_format", "gguf_file") if any(k in m for m in items)]
    table = Table(Column("id", no_wrap=True), *keys[1:])
    for item in items:
        table.add_row(*("-" if item.get(k) is None else str(item[k]) for k in keys))
    out.print(table)
