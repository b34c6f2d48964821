"""Where cached images and latents live: a local folder (default) or an S3-compatible bucket.

Content-addressed: a blob's key is the sha256 of its bytes, so a key names exactly one content,
and a reader checks it. Local writes go to a temporary file in the same folder, are fsynced and
renamed into place: a crash leaves either no blob or a whole one, never a torn one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from ..errors import CacheUnavailable, VoltacacheError


class CorruptBlob(VoltacacheError):
    pass


def blob_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified(key: str, data: bytes, where: str) -> bytes:
    if blob_key(data) != key:
        raise CorruptBlob(f"{where}: content does not match its key (torn or altered); it is not served")
    return data


class LocalBlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.scandir(self.root).close()  # a folder this process can read
        except OSError as e:
            raise CacheUnavailable(
                f"blob store {self.root}: {e.strerror or e}; give a folder this process can write"
            ) from e

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def put(self, data: bytes) -> str:
        key = blob_key(data)
        target = self.path(key)
        if target.exists():
            return key
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def get(self, key: str) -> bytes | None:
        path = self.path(key)
        if not path.is_file():
            return None
        return verified(key, path.read_bytes(), str(path))

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def keys(self) -> list[str]:
        return [p.name for p in self.root.glob("??/*") if not p.name.startswith(".tmp-")]

    def clear(self) -> None:
        for key in self.keys():
            self.delete(key)

    def drop_temporaries(self, older_than_s: float = 600.0) -> int:
        """Remove the temporaries of writes a crash interrupted (old enough not to be in flight)."""
        stale = [p for p in self.root.glob("??/.tmp-*") if time.time() - p.stat().st_mtime > older_than_s]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


class S3BlobStore:
    """The same interface over an S3-compatible bucket (s3://bucket/prefix; endpoint from AWS_ENDPOINT_URL)."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        try:
            import boto3
        except ImportError as e:
            raise VoltacacheError(f"{uri}: an S3 blob store needs boto3 (pip install 'voltacache[s3]')") from e

        parsed = urlparse(uri)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.s3 = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))

    def name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, data: bytes) -> str:
        key = blob_key(data)
        self.s3.put_object(Bucket=self.bucket, Key=self.name(key), Body=data)  # S3 PUTs are atomic
        return key

    def get(self, key: str) -> bytes | None:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self.name(key))["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None
        return verified(key, body, f"s3://{self.bucket}/{self.name(key)}")

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.name(key))

    def keys(self) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        return [obj["Key"].rsplit("/", 1)[-1] for page in pages for obj in page.get("Contents", [])]

    def clear(self) -> None:
        for key in self.keys():
            self.delete(key)

    def drop_temporaries(self, older_than_s: float = 600.0) -> int:
        return 0  # a PUT is atomic: an interrupted one leaves nothing behind


def open_blob_store(location: str | Path):
    text = str(location)
    return S3BlobStore(text) if text.startswith("s3://") else LocalBlobStore(Path(text))
