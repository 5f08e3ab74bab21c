"""Artifact and data commands of the HTTP client: ``taq profile``, ``download``, ``models`` and
``taq datasets list`` / ``taq datasets delete`` (options and exit codes as in cli/client.py)."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich import box
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from cli.app import app
from cli.client import (
    DEFAULT_URL,
    EXIT_CHECKSUM,
    EXIT_SERVER,
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
    out,
    page_params,
    print_json,
    print_next_cursor,
)

datasets = typer.Typer(help="Uploaded calibration / eval datasets: list and delete.", no_args_is_help=True)
app.add_typer(datasets, name="datasets", rich_help_panel="Client")


def _write_file(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        fail(EXIT_USAGE, f"cannot write {path}: {exc.strerror or exc}")


@app.command(rich_help_panel="Client")
def profile(
    job_id: JobArg,
    png: Annotated[Path | None, typer.Option("--png", help="save the profile plot to this file")] = None,
    as_json: JsonOut = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Show a job's per-layer sensitivity profile and chosen bits."""
    client = Client(url, api_key)
    if png is not None:
        _write_file(png, client.request("GET", f"/v1/jobs/{job_id}/profile", params={"format": "png"}).content)
        if not as_json:
            err.print(f"saved {png}", highlight=False)
    data = client.json("GET", f"/v1/jobs/{job_id}/profile")
    if as_json:
        return print_json(data)
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
    fail(EXIT_SERVER, f"artifact_not_found: no artifact '{name}'; available: {', '.join(names) or 'none'}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@app.command(rich_help_panel="Client")
def download(
    job_id: JobArg,
    name: Annotated[str, typer.Argument(help="artifact name (e.g. model.gguf, hf, hf/config.json)")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="file to write")] = None,
    as_json: JsonOut = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
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
            with client.stream(
                "GET",
                f"/v1/jobs/{job_id}/artifacts/{art_name}",
                headers=headers,
                timeout=httpx.Timeout(60.0, read=300.0),
            ) as response:
                append = have > 0 and response.status_code == 206
                resumed = have if append else 0
                progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TaskProgressColumn(),
                    TimeElapsedColumn(),
                    console=err,
                    disable=as_json,
                )
                with progress, target.open("ab" if append else "wb") as fh:
                    task = progress.add_task(target.name, total=size, completed=resumed)
                    for chunk in response.iter_bytes(1 << 20):
                        fh.write(chunk)
                        progress.advance(task, len(chunk))
        actual = _sha256_file(target)
    except OSError as exc:
        fail(EXIT_USAGE, f"cannot write {target}: {exc.strerror or exc}")
    except httpx.HTTPError as exc:
        client._transport_error(exc)
    if actual != sha:
        with contextlib.suppress(OSError):
            target.unlink()
        fail(
            EXIT_CHECKSUM,
            f"checksum_mismatch: {target} has sha256 {actual}, the listing says {sha}; "
            "the file was removed, download it again",
        )
    info = {
        "name": art_name,
        "path": str(target),
        "size": target.stat().st_size,
        "sha256": actual,
        "resumed_from": resumed,
    }
    if as_json:
        return print_json(info)
    note = f" (resumed at byte {resumed})" if resumed else ""
    out.print(f"{target}  {info['size']} bytes  sha256 ok{note}", highlight=False)


@app.command(rich_help_panel="Client")
def models(as_json: JsonOut = False, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List the model ids the service can load."""
    items = Client(url, api_key).json("GET", "/v1/models")
    if as_json:
        return print_json(items)
    keys = ["id"] + [k for k in ("kind", "weights_format", "gguf_file") if any(k in m for m in items)]
    table = Table(Column("id", no_wrap=True), *keys[1:])
    for item in items:
        table.add_row(*("-" if item.get(k) is None else str(item[k]) for k in keys))
    out.print(table)


@datasets.command("list")
def datasets_list(
    limit: PageLimit = None,
    cursor: PageCursor = None,
    as_json: JsonOut = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List your datasets, newest first."""
    page = Client(url, api_key).json("GET", "/v1/datasets", params=page_params(limit, cursor))
    if as_json:
        return print_json(page)
    table = Table(
        Column("id", no_wrap=True),
        "rows",
        "answers",
        "bytes",
        "filename",
        "created",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for item in page["items"]:
        table.add_row(
            item["id"],
            str(item["rows"]),
            "yes" if item.get("has_answers") else "no",
            str(item["size"]),
            str(item.get("filename") or "-"),
            str(item["created_at"]),
        )
    out.print(table)
    print_next_cursor(page)


@datasets.command("delete")
def datasets_delete(
    dataset_id: Annotated[str, typer.Argument(metavar="DATASET")], url: Url = DEFAULT_URL, api_key: ApiKey = None
) -> None:
    """Delete a dataset (refused with 409 dataset_in_use while a queued or running job reads it)."""
    Client(url, api_key).request("DELETE", f"/v1/datasets/{dataset_id}")
    out.print(f"{dataset_id} deleted", highlight=False)
