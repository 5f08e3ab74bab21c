"""What the HTTP client commands share: the `Client` (httpx, every failure mapped to a documented
exit code), the common options, waiting for a job, and reading local files.

Client exit codes:

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

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from cli.app import app
from common.job_status import FINISHED_STATUSES

(EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_SERVER, EXIT_CONNECTION, EXIT_TIMEOUT, EXIT_CHECKSUM, EXIT_AUTH) = range(8)
DEFAULT_URL = "http://127.0.0.1:8000"

EXIT_CODES_HELP = (
    "Client exit codes: 0 ok, 1 job failed/cancelled, 2 usage error, 3 server error response "
    "(printed as error.code: message), 4 connection error, 5 timeout, 6 checksum mismatch, "
    "7 authentication refused (401/403: no, wrong or revoked API key). "
    "Client commands use --url / TAQ_URL and --api-key / TAQ_API_KEY."
)
app.info.epilog = EXIT_CODES_HELP

out = Console()
err = Console(stderr=True)

Url = Annotated[str, typer.Option("--url", envvar="TAQ_URL", help="service base URL")]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="TAQ_API_KEY", show_default=False, help="API key (sent as Authorization: Bearer)"),
]
JsonOut = Annotated[bool, typer.Option("--json", help="print JSON")]
JobArg = Annotated[str, typer.Argument(metavar="JOB")]
#: the options of the listing commands, and what they send (`page_params`)
PageLimit = Annotated[int | None, typer.Option(min=1)]
PageCursor = Annotated[str | None, typer.Option(help="next_cursor of a previous page")]


def fail(code: int, message: str) -> NoReturn:
    err.print(message, markup=False, highlight=False)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def page_params(limit: int | None, cursor: str | None) -> dict[str, Any]:
    """The query parameters that ask a listing for one page (--limit, --cursor)."""
    params: dict[str, Any] = {}
    if limit is not None:
        params["limit"] = limit
    if cursor:
        params["cursor"] = cursor
    return params


def print_next_cursor(page: dict) -> None:
    """After a page's table, how to ask for the next page (on stderr), when there is one."""
    if page.get("next_cursor"):
        err.print(f"more: --cursor {page['next_cursor']}", highlight=False)


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
            fail(EXIT_TIMEOUT, f"timeout talking to {self.url}: {exc or type(exc).__name__}")
        fail(EXIT_CONNECTION, f"cannot reach {self.url}: {exc or type(exc).__name__}")

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
            fail(EXIT_AUTH, text + "\n(pass --api-key KEY or set TAQ_API_KEY)")
        fail(EXIT_SERVER, text)

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
            fail(EXIT_SERVER, f"invalid_response: {method} {path} did not answer JSON")

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


def read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        fail(EXIT_USAGE, f"cannot read {what} {path}: {exc.strerror or exc}")
    except ValueError as exc:
        fail(EXIT_USAGE, f"{what} {path} is not valid JSON: {exc}")


def upload_file(client: Client, path: Path) -> dict:
    try:
        data = path.read_bytes()
    except OSError as exc:
        fail(EXIT_USAGE, f"cannot read {path}: {exc.strerror or exc}")
    return client.json("POST", "/v1/datasets", files={"file": (path.name, data, "application/jsonl")})


# ---- waiting ---------------------------------------------------------------------------------
def wait_job(client: Client, job_id: str, timeout: float | None, interval: float, show: bool) -> dict:
    deadline = None if timeout is None else time.monotonic() + timeout
    job = client.json("GET", f"/v1/jobs/{job_id}")
    progress = Progress(
        TextColumn("[bold]{task.fields[job]}"),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not show,
        transient=False,
    )
    with progress:
        task = progress.add_task(job["status"], total=1.0, job=job_id)
        while True:
            label = job["status"] + (f" · {job['stage']}" if job.get("stage") else "")
            progress.update(task, completed=job.get("progress") or 0.0, description=label)
            if job["status"] in FINISHED_STATUSES:
                break
            if deadline is not None and time.monotonic() >= deadline:
                progress.stop()
                fail(EXIT_TIMEOUT, f"timeout: job {job_id} still {job['status']} after {timeout:g}s")
            time.sleep(interval if deadline is None else max(0.05, min(interval, deadline - time.monotonic())))
            job = client.json("GET", f"/v1/jobs/{job_id}")
    return job


def finish(job: dict, as_json: bool) -> NoReturn:
    if as_json:
        print_json(job)
    if job["status"] == "succeeded":
        if not as_json:
            out.print(f"{job['id']} succeeded", highlight=False)
        raise typer.Exit(EXIT_OK)
    error = job.get("error") or {}
    why = f": {error.get('code')}: {error.get('message')}" if error else ""
    fail(EXIT_JOB_FAILED, f"job {job['id']} {job['status']}{why}")
