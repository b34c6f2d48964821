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
