"""The storage contract, run against file:// and an S3 server (moto, over HTTP)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from common.artifacts import iter_tar, parse_range, tar_digest, tar_layout
from common.errors import InvalidKey, NotFound, RangeNotSatisfiable
from common.storage import FileStorage, dataset_key, job_key, storage_from_url, validate_key
from common.storage_s3 import S3Storage

from .conftest import make_bucket

pytestmark = pytest.mark.integration


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path):
    if request.param == "file":
        return storage_from_url(f"file://{tmp_path / 'objects'}")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = make_bucket(endpoint)
    return storage_from_url(f"s3://{bucket}/some/prefix", endpoint_url=endpoint)


def test_put_get_exists_size_sha(storage, tmp_path):
    data = bytes(range(256)) * 1000
    info = storage.put_bytes("jobs/job_1/artifacts/a.bin", data)
    assert info.size == len(data)
    assert storage.exists("jobs/job_1/artifacts/a.bin")
    assert not storage.exists("jobs/job_1/artifacts/b.bin")
    assert storage.size("jobs/job_1/artifacts/a.bin") == len(data)
    assert storage.get_bytes("jobs/job_1/artifacts/a.bin") == data
    assert storage.sha256("jobs/job_1/artifacts/a.bin") == hashlib.sha256(data).hexdigest()
    src = tmp_path / "file.bin"
    src.write_bytes(data[::-1])
    storage.put_file("jobs/job_1/artifacts/hf/model.safetensors", src)
    assert storage.get_bytes("jobs/job_1/artifacts/hf/model.safetensors") == data[::-1]
    # overwrite is atomic and complete
    storage.put_bytes("jobs/job_1/artifacts/a.bin", b"short")
    assert storage.get_bytes("jobs/job_1/artifacts/a.bin") == b"short"


def test_ranges(storage):
    data = bytes(range(256)) * 4096  # 1 MiB: crosses the 1 MiB chunking of the file store
    storage.put_bytes("jobs/j/r.bin", data)
    assert b"".join(storage.open_range("jobs/j/r.bin", 10, 19)) == data[10:20]
    assert b"".join(storage.open_range("jobs/j/r.bin", len(data) - 5)) == data[-5:]
    assert b"".join(storage.open_range("jobs/j/r.bin", 0, len(data) - 1)) == data
    with pytest.raises(NotFound):
        list(storage.open_range("jobs/j/missing.bin"))
    with pytest.raises(NotFound):
        storage.size("jobs/j/missing.bin")


def test_list_and_delete_prefix(storage):
    for key in (
        "jobs/a/x.json",
        "jobs/a/hf/config.json",
        "jobs/a/hf/model.safetensors",
        "jobs/ab/y.json",
        "datasets/" + "0" * 64 + ".jsonl",
    ):
        storage.put_bytes(key, key.encode())
    assert [o.key for o in storage.list("jobs/a/")] == [
        "jobs/a/hf/config.json",
        "jobs/a/hf/model.safetensors",
        "jobs/a/x.json",
    ]
    assert {o.key for o in storage.list("jobs/a")} >= {"jobs/ab/y.json", "jobs/a/x.json"}
    assert storage.list("jobs/nothing/") == []
    assert storage.delete_prefix("jobs/a/") == 3
    assert storage.list("jobs/a/") == []
    assert storage.exists("jobs/ab/y.json")
    assert storage.exists("datasets/" + "0" * 64 + ".jsonl")
    with pytest.raises(InvalidKey):
        storage.delete_prefix("")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "/etc/passwd",
        "../x",
        "jobs/../../x",
        "jobs/./x",
        "jobs//x",
        ".hidden",
        "jobs/a/.tmp",
        "a\\b",
        "a b",
        "jobs/\x00",
        "x" * 1000,
    ],
)
def test_keys_are_validated(storage, bad):
    with pytest.raises(InvalidKey):
        storage.put_bytes(bad, b"x")
    with pytest.raises(InvalidKey):
        storage.exists(bad)


def test_key_builders():
    assert job_key("job_1", "artifacts", "profile.json") == "jobs/job_1/artifacts/profile.json"
    with pytest.raises(InvalidKey):
        job_key("../x", "a")
    with pytest.raises(InvalidKey):
        dataset_key("not-a-digest")
    assert validate_key("datasets/" + "a" * 64 + ".jsonl")


def test_file_store_writes_atomically(tmp_path):
    store = FileStorage(tmp_path / "objects")
    big = b"x" * (8 * 1024 * 1024)
    seen = []

    def reader():
        for _ in range(50):
            if store.exists("jobs/j/big.bin"):
                seen.append(store.size("jobs/j/big.bin"))

    thread = threading.Thread(target=reader)
    thread.start()
    store.put_bytes("jobs/j/big.bin", big)
    thread.join()
    assert all(size == len(big) for size in seen)  # never a partial file under the real name
    assert [p.name for p in (tmp_path / "objects/jobs/j").iterdir()] == ["big.bin"]  # no temp left


@pytest.mark.parametrize("link_works", [True, False], ids=["hard-link", "copy-fallback"])
def test_handed_over_file_is_linked_not_copied(tmp_path, monkeypatch, link_works):
    """A handed-over file (an export the caller will only read and delete) is stored by a hard
    link when the filesystem allows one, else copied; either way the object outlives the source
    and no temp file is left."""
    import os

    store = FileStorage(tmp_path / "objects")
    src = tmp_path / "work" / "model.gguf"
    src.parent.mkdir()
    src.write_bytes(b"gguf" * 1000)
    if not link_works:

        def refuse(*args, **kwargs):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", refuse)
    info = store.put_file("jobs/j/model.gguf", src, handover=True)
    stored = tmp_path / "objects/jobs/j/model.gguf"
    assert info.size == 4000 and (stored.stat().st_ino == src.stat().st_ino) == link_works
    src.unlink()
    assert store.get_bytes("jobs/j/model.gguf") == b"gguf" * 1000
    assert [p.name for p in stored.parent.iterdir()] == ["model.gguf"]
    # without handover the store always copies
    src.write_bytes(b"again")
    store.put_file("jobs/j/copy.bin", src)
    assert (tmp_path / "objects/jobs/j/copy.bin").stat().st_ino != src.stat().st_ino


def test_s3_multipart_and_metadata(s3_endpoint, tmp_path, monkeypatch):
    bucket = make_bucket(s3_endpoint)
    store = S3Storage(bucket, "p", endpoint_url=s3_endpoint)
    monkeypatch.setattr(S3Storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)  # S3's minimum part size
    data = (bytes(range(256)) * 4096) * 12  # 12 MiB -> 3 parts
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store.put_file("jobs/j/big.bin", src)
    assert store.size("jobs/j/big.bin") == len(data)
    assert store.sha256("jobs/j/big.bin") == hashlib.sha256(data).hexdigest()
    head = store.client.head_object(Bucket=bucket, Key="p/jobs/j/big.bin")
    assert "-" in head["ETag"]  # a multipart upload
    assert store.presigned_url("jobs/j/big.bin").startswith(s3_endpoint)
    store.check()


def test_tar_stream_is_deterministic_and_rangeable(storage):
    files = {"config.json": b'{"a": 1}\n', "model.safetensors": b"\x01" * 1500, "sub/tok.json": b"{}"}
    for name, data in files.items():
        storage.put_bytes(f"jobs/j/artifacts/hf/{name}", data)
    layout = tar_layout("hf", [(n, len(d), f"jobs/j/artifacts/hf/{n}") for n, d in files.items()])
    blob = b"".join(iter_tar(storage, layout))
    assert len(blob) == layout.size and layout.size % 512 == 0
    assert hashlib.sha256(blob).hexdigest() == tar_digest(storage, layout)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert members == {f"hf/{n}": d for n, d in files.items()}
    for start, end in [(0, 0), (100, 700), (511, 1600), (layout.size - 10, layout.size - 1)]:
        assert b"".join(iter_tar(storage, layout, start, end)) == blob[start : end + 1]
    again = tar_layout("hf", [(n, len(d), f"jobs/j/artifacts/hf/{n}") for n, d in reversed(files.items())])
    assert tar_digest(storage, again) == hashlib.sha256(blob).hexdigest()


def test_parse_range():
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=95-200", 100) == (95, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None
    assert parse_range("items=0-1", 100) is None
    for bad in ("bytes=100-", "bytes=5-2", "bytes=-0"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(bad, 100)


def test_readiness_probe_fails_for_missing_bucket(s3_endpoint):
    store = S3Storage("no-such-bucket-taq", endpoint_url=s3_endpoint)
    with pytest.raises(ClientError):
        store.check()


def test_storage_from_url_rejects_unknown():
    with pytest.raises(ValueError):
        storage_from_url("ftp://x/y")
    with pytest.raises(ValueError):
        storage_from_url("s3:///nobucket")
    assert isinstance(storage_from_url("file:///tmp/taq-x"), FileStorage)
    assert Path("/tmp/taq-x").is_dir()
