"""Object storage: one interface (common/storage_base.py, re-exported here), a ``file://`` and an
``s3://`` implementation (common/storage_s3.py, imported only for an ``s3://`` URL).

Keys are always built by the service (``jobs/{job_id}/…``, ``datasets/{sha256}.jsonl``), never
taken from user text; every key is validated anyway (no ``..``, no absolute paths, no hidden
names) so a bug cannot turn into a path traversal.

Writes are atomic: the file store writes (or, for a file handed over, hard-links) a hidden temp
file next to the target and ``os.replace``s it; S3 PUTs (single or multipart) are atomic by nature.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote, urlparse

from common.errors import InvalidKey, NotFound
from common.storage_base import (
    CHUNK,
    MAX_KEY_LENGTH,
    ObjectInfo,
    Storage,
    dataset_key,
    job_key,
    validate_key,
    validate_prefix,
)

if TYPE_CHECKING:
    from common.settings import Settings

__all__ = [
    "CHUNK",
    "MAX_KEY_LENGTH",
    "FileStorage",
    "ObjectInfo",
    "Storage",
    "dataset_key",
    "job_key",
    "storage_from_settings",
    "storage_from_url",
    "validate_key",
    "validate_prefix",
]


class FileStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if self.root not in path.parents:
            raise InvalidKey(f"invalid storage key {key!r}")
        return path

    def _atomic(self, key: str, fill: Callable[[Path], None]) -> ObjectInfo:
        """`fill` makes a hidden temp file next to the target, durable; it then replaces the target."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
        try:
            fill(tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ObjectInfo(key, target.stat().st_size)

    def _atomic_write(self, key: str, writer: Callable[[BinaryIO], object]) -> ObjectInfo:
        def fill(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                writer(out)
                out.flush()
                os.fsync(out.fileno())

        return self._atomic(key, fill)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._atomic_write(key, lambda out: out.write(data))

    def put_file(self, key: str, path: Path, *, handover: bool = False) -> ObjectInfo:
        if handover:
            # a handed-over file is stored by a hard link (no copy: an 8B export writes ~12 GB);
            # copied when the filesystem refuses one (another device, no hard links)
            try:
                return self._atomic(key, partial(_link_durably, path))
            except _LinkRefused:
                pass

        def copy(out: BinaryIO) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)

        return self._atomic_write(key, copy)

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by _iter when the stream ends
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"object {key} not found", code="object_not_found") from None
        return self._iter(handle, start, end)

    @staticmethod
    def _iter(handle: BinaryIO, start: int, end: int | None) -> Iterator[bytes]:
        with handle:
            handle.seek(start)
            remaining = None if end is None else end - start + 1
            while remaining is None or remaining > 0:
                chunk = handle.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"object {key} not found", code="object_not_found") from None

    def list(self, prefix: str) -> list[ObjectInfo]:
        validate_prefix(prefix)
        # walk the deepest directory fully named by the prefix, filter by string prefix
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root / base_rel if base_rel else self.root
        if not base.is_dir():
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue  # in-flight temp files
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found.append(ObjectInfo(key, full.stat().st_size))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise InvalidKey("refusing to delete the whole store")
        objects = self.list(prefix)
        for obj in objects:
            self._path(obj.key).unlink(missing_ok=True)
        # prune directories left empty below the prefix
        base = self.root / prefix.rstrip("/")
        if prefix.endswith("/") and base.is_dir():
            for dirpath, _dirs, _files in sorted(os.walk(base), key=lambda t: -len(t[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        return len(objects)

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def check(self) -> None:
        # a read-only probe: the root exists and this process may write into it (access(2), no write)
        if not self.root.is_dir():
            raise OSError(f"storage root {self.root.name} is missing")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PermissionError(f"storage root {self.root.name} is not writable")


class _LinkRefused(Exception):
    pass


def _link_durably(source: Path, tmp: Path) -> None:
    try:
        os.link(source, tmp)
    except OSError as exc:
        raise _LinkRefused from exc
    with open(tmp, "rb") as linked:
        os.fsync(linked.fileno())


def storage_from_url(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> Storage:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = unquote(parsed.netloc + parsed.path) if parsed.netloc not in ("", "localhost") else unquote(parsed.path)
        return FileStorage(Path(path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError("TAQ_STORAGE_URL s3:// needs a bucket: s3://bucket/prefix")
        from common.storage_s3 import S3Storage

        return S3Storage(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url, region=region)
    raise ValueError(f"unsupported TAQ_STORAGE_URL scheme {parsed.scheme!r} (file:// or s3://)")


def storage_from_settings(settings: Settings) -> Storage:
    return storage_from_url(settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
