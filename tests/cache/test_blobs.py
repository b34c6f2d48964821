import pytest

from voltacache.cache.blobs import CorruptBlob, LocalBlobStore, blob_key


def test_content_addressed_round_trip(tmp_path):
    store = LocalBlobStore(tmp_path)
    key = store.put(b"latent bytes")
    assert key == blob_key(b"latent bytes") and store.get(key) == b"latent bytes"
    assert store.put(b"latent bytes") == key and store.keys() == [key]
    assert store.get("0" * 64) is None


def test_torn_blob_is_reported_not_served(tmp_path):
    store = LocalBlobStore(tmp_path)
    key = store.put(b"a whole image")
    store.path(key).write_bytes(b"a wh")  # what a crash mid-write would leave without the atomic rename
    with pytest.raises(CorruptBlob, match=key):
        store.get(key)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import os

    store = LocalBlobStore(tmp_path)

    def crash(*args):
        raise OSError("disk died")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        store.put(b"never stored")
    assert store.keys() == [] and not any(p.is_file() for p in tmp_path.rglob("*"))


@pytest.fixture
def bucket(s3_endpoint):
    import uuid

    import boto3

    name = f"voltacache-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def test_s3_store_round_trip(bucket):
    from voltacache.cache.blobs import open_blob_store

    store = open_blob_store(f"s3://{bucket}/cache")
    key = store.put(b"an image in a bucket")
    assert store.get(key) == b"an image in a bucket" and store.keys() == [key]
    assert store.get("f" * 64) is None
    store.delete(key)
    assert store.keys() == []


def test_s3_altered_object_is_not_served(bucket):
    import boto3

    from voltacache.cache.blobs import open_blob_store

    store = open_blob_store(f"s3://{bucket}")
    key = store.put(b"original")
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"altered")
    with pytest.raises(CorruptBlob):
        store.get(key)


def test_cache_store_over_s3(bucket, tmp_path):
    import numpy as np

    from voltacache.cache.store import CacheStore

    store = CacheStore(str(tmp_path / "index.db"), f"s3://{bucket}/blobs", dim=4)
    store.put(np.array([1.0, 0, 0, 0]), "scope", "image", b"shared image")
    hit = store.search(np.array([1.0, 0, 0, 0]), "scope", "image")[0]
    assert store.payload(hit) == b"shared image"
