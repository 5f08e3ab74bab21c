"""The object-storage interface and its keys (common/storage.py has the file store and the
factories, common/storage_s3.py the S3 store; both build on this module, which imports neither)."""

from __future__ import annotations

import builtins
import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.errors import InvalidKey

CHUNK = 1024 * 1024
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._+=-]{0,254}"
_KEY_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
MAX_KEY_LENGTH = 900


def validate_key(key: str) -> str:
    if (
        not isinstance(key, str)
        or len(key) > MAX_KEY_LENGTH
        or not _KEY_RE.match(key)
        or any(part in (".", "..") for part in key.split("/"))
    ):
        raise InvalidKey(f"invalid storage key {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """A prefix is empty, a key, or a key followed by '/'."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def job_key(job_id: str, *parts: str) -> str:
    return validate_key("/".join(("jobs", job_id, *parts)))


def dataset_key(sha256: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise InvalidKey("dataset key needs a sha256 hex digest")
    return f"datasets/{sha256}.jsonl"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class Storage(ABC):
    """Byte objects addressed by validated keys."""

    url: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...

    @abstractmethod
    def put_file(self, key: str, path: Path, *, handover: bool = False) -> ObjectInfo:
        """Store the file at ``path`` under ``key``. ``handover``: the caller will not write to
        ``path`` again (it may read or delete it), so a store may keep the very file instead of a
        copy (the file store hard-links it when ``path`` is on the same filesystem)."""

    @abstractmethod
    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Yield the bytes ``[start, end]`` (inclusive end; None = to the end) in chunks."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int: ...

    @abstractmethod
    def check(self) -> None:
        """Raise when the store is unreachable (readiness probe; reads only: a probe polled every
        few seconds must not write)."""

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.open_range(key))

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        for chunk in self.open_range(key):
            digest.update(chunk)
        return digest.hexdigest()

    def download_to(self, key: str, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            for chunk in self.open_range(key):
                out.write(chunk)
        return path

    def put_tree(self, prefix: str, directory: Path) -> builtins.list[ObjectInfo]:  # list: the method above
        """Upload every file under ``directory`` to ``prefix/relative/path``."""
        written = []
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = path.relative_to(directory).as_posix()
            written.append(self.put_file(f"{prefix.rstrip('/')}/{rel}", path))
        return written

    def presigned_url(self, key: str, expires: int = 300, filename: str | None = None) -> str | None:
        return None

    def local_path(self, key: str) -> Path | None:
        """The object's file on this machine when the store is a local directory, else None."""
        return None


# ------------------------------------------------------------------------------------------
