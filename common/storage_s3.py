"""The ``s3://`` object store (S3 or an S3-compatible one such as MinIO): common/storage.py has the
interface, key validation and the ``file://`` store; this module is imported only when an
``s3://`` URL is configured, so the embedded default never loads boto3."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.errors import InvalidKey, NotFound
from common.storage_base import CHUNK, ObjectInfo, Storage, validate_key, validate_prefix

__all__ = ["S3Storage"]


class S3Storage(Storage):
    """S3 or an S3-compatible store (MinIO via ``endpoint_url``)."""

    MULTIPART_THRESHOLD = 64 * 1024 * 1024

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                s3={"addressing_style": "path"} if endpoint_url else None,
            ),
        )

    def _k(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _strip(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    @staticmethod
    def _missing(exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        digest = hashlib.sha256(data).hexdigest()
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, Metadata={"sha256": digest})
        return ObjectInfo(key, len(data))

    def put_file(self, key: str, path: Path, *, handover: bool = False) -> ObjectInfo:
        from boto3.s3.transfer import TransferConfig

        digest = hashlib.sha256()
        with open(path, "rb") as src:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                digest.update(chunk)
        config = TransferConfig(
            multipart_threshold=self.MULTIPART_THRESHOLD, multipart_chunksize=self.MULTIPART_THRESHOLD
        )
        self.client.upload_file(
            str(path), self.bucket, self._k(key), Config=config, ExtraArgs={"Metadata": {"sha256": digest.hexdigest()}}
        )
        return ObjectInfo(key, Path(path).stat().st_size)

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        kwargs = {}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._k(key), **kwargs)["Body"]
        except ClientError as exc:
            if self._missing(exc):
                raise NotFound(f"object {key} not found", code="object_not_found") from None
            if getattr(exc, "response", {}).get("Error", {}).get("Code") == "InvalidRange":
                return iter(())
            raise

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return chunks()

    def _head(self, key: str) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return head
        except ClientError as exc:
            if self._missing(exc):
                raise NotFound(f"object {key} not found", code="object_not_found") from None
            raise

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except NotFound:
            return False

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def sha256(self, key: str) -> str:
        stored = self._head(key).get("Metadata", {}).get("sha256")
        return stored or super().sha256(key)

    def list(self, prefix: str) -> list[ObjectInfo]:
        validate_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for item in page.get("Contents", []):
                found.append(ObjectInfo(self._strip(item["Key"]), int(item["Size"])))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise InvalidKey("refusing to delete the whole store")
        keys = [self._k(o.key) for o in self.list(prefix)]
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
        return len(keys)

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def presigned_url(self, key: str, expires: int = 300, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._k(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        url: str = self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)
        return url
