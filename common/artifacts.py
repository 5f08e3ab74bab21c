"""Artifact downloads: byte ranges, and directory artifacts streamed as a deterministic .tar.

A directory artifact (the ``hf`` export) is stored file by file under its prefix. Its tar is never
materialised: the archive is a fixed sequence of segments (header bytes, file bytes from storage,
padding) so its size and sha256 are known at publish time and any byte range can be served.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import RangeNotSatisfiable
from common.storage import Storage

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from common.settings import Settings

BLOCK = 512


@dataclass(frozen=True)
class Segment:
    offset: int
    length: int
    data: bytes | None = None  # literal bytes (headers, padding)
    key: str | None = None  # or an object in storage


@dataclass(frozen=True)
class TarLayout:
    segments: tuple[Segment, ...]
    size: int


def _header(name: str, size: int, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def tar_layout(root_name: str, files: Sequence[tuple[str, int, str]]) -> TarLayout:
    """``files``: (relative name, size, storage key), archived as ``root_name/relative name``."""
    parts: list[tuple[bytes | None, str | None, int]] = []
    seen_dirs: set[str] = set()

    def add_dir(path: str) -> None:
        if path not in seen_dirs:
            seen_dirs.add(path)
            parts.append((_header(path + "/", 0, directory=True), None, 0))

    add_dir(root_name)
    for name, size, key in sorted(files):
        pieces = name.split("/")
        for i in range(1, len(pieces)):
            add_dir("/".join([root_name, *pieces[:i]]))
        parts.append((_header(f"{root_name}/{name}", size), None, 0))
        parts.append((None, key, size))
        if size % BLOCK:
            parts.append((b"\0" * (BLOCK - size % BLOCK), None, 0))
    parts.append((b"\0" * (2 * BLOCK), None, 0))
    segments, offset = [], 0
    for data, part_key, size in parts:
        length = len(data) if data is not None else size
        if length:
            segments.append(Segment(offset, length, data=data, key=part_key))
            offset += length
    return TarLayout(tuple(segments), offset)


def iter_tar(storage: Storage, layout: TarLayout, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    end = layout.size - 1 if end is None else end
    for seg in layout.segments:
        seg_end = seg.offset + seg.length - 1
        if seg_end < start or seg.offset > end:
            continue
        lo, hi = max(start, seg.offset) - seg.offset, min(end, seg_end) - seg.offset
        if seg.data is not None:
            yield seg.data[lo : hi + 1]
        else:
            assert seg.key is not None  # a segment holds bytes or names an object
            yield from storage.open_range(seg.key, lo, hi)


def tar_digest(storage: Storage, layout: TarLayout) -> str:
    digest = hashlib.sha256()
    for chunk in iter_tar(storage, layout):
        digest.update(chunk)
    return digest.hexdigest()


def tar_digest_local(layout: TarLayout, paths: dict[str, Path]) -> str:
    """The same digest from local copies of the files (`paths`: storage key -> local file), so a
    worker that just wrote them need not read them back from the store."""
    digest = hashlib.sha256()
    for seg in layout.segments:
        if seg.data is not None:
            digest.update(seg.data)
            continue
        assert seg.key is not None  # a segment holds bytes or names an object
        with open(paths[seg.key], "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# at most 19 digits a side (a 64-bit offset): a longer number is malformed, not a 500 from int()
_RANGE_RE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range → inclusive (start, end); None = serve the whole body (no header,
    or several ranges, which we answer with the full representation as RFC 9110 allows)."""
    if not header:
        return None
    header = header.strip()
    if "," in header:
        return None
    match = _RANGE_RE.match(header.replace(" ", ""))
    if not match or match.groups() == ("", ""):
        return None  # malformed: ignore, per RFC 9110
    first, last = match.groups()
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header} is not satisfiable (size {size})", details={"size": size})
        return max(0, size - suffix), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        raise RangeNotSatisfiable(f"range {header} is not satisfiable (size {size})", details={"size": size})
    return start, end


# ---- downloads -------------------------------------------------------------------------------
CONTENT_TYPES = {
    "json": "application/json",
    "png": "image/png",
    "gguf": "application/octet-stream",
    "safetensors": "application/octet-stream",
    "tar": "application/x-tar",
    "txt": "text/plain; charset=utf-8",
    "jsonl": "application/x-ndjson",
}


@dataclass
class Download:
    status: int  # 200, 206, 304 or 307
    headers: dict[str, str]
    body: Iterator[bytes] | None = None
    redirect: str | None = None


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return etag in tags


def open_download(
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: str,
    job_id: str,
    name: str,
    *,
    range_header: str | None = None,
    if_none_match: str | None = None,
    if_range: str | None = None,
    head: bool = False,
) -> Download:
    """What a GET (or, with `head`, a HEAD: the same status and headers, no body opened) of one
    artifact answers."""
    from common.jobs import get_artifact

    artifact, entry = get_artifact(session, tenant, job_id, name)
    reader: Callable[[int, int], Iterator[bytes]]
    key: str | None
    if artifact.kind == "directory" and entry is None:
        files = [
            (f["name"], f["size"], f"{artifact.storage_key.rstrip('/')}/{f['name']}") for f in artifact.files or []
        ]
        layout = tar_layout(artifact.name, files)
        size, digest, filename, ctype = layout.size, artifact.sha256, f"{artifact.name}.tar", CONTENT_TYPES["tar"]
        reader = lambda start, end: iter_tar(storage, layout, start, end)  # noqa: E731
        key = None
    else:
        if entry is not None:
            key = f"{artifact.storage_key.rstrip('/')}/{entry['name']}"
            size, digest = entry["size"], entry["sha256"]
            filename = entry["name"].rsplit("/", 1)[-1]
        else:
            key, size, digest = artifact.storage_key, artifact.size, artifact.sha256
            filename = artifact.name.rsplit("/", 1)[-1]
        ext = filename.rsplit(".", 1)[-1] if "." in filename else ""
        ctype = CONTENT_TYPES.get(ext, "application/octet-stream")
        object_key = key
        reader = lambda start, end: storage.open_range(object_key, start, end)  # noqa: E731
    etag = f'"{digest}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, max-age=0, must-revalidate",
        "X-Checksum-Sha256": digest,
    }
    if _etag_matches(if_none_match, etag):
        return Download(304, headers)
    if key is not None and settings.s3_presign_downloads and not range_header:
        url = storage.presigned_url(key, filename=filename)
        if url:
            return Download(307, {**headers, "Location": url}, redirect=url)
    span = parse_range(range_header, size)
    if span is not None and if_range and if_range.strip() != etag:
        span = None  # the client's copy is outdated: send it all
    headers["Content-Type"] = ctype
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if span is None:
        headers["Content-Length"] = str(size)
        return Download(200, headers, None if head else (reader(0, size - 1) if size else iter(())))
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    return Download(206, headers, None if head else reader(start, end))
