import numpy as np
import pytest

from voltacache.cache.store import CacheStore, scope_key

SCOPE = scope_key("model-a", size=64, steps=20, guidance=7.5, scheduler="ddim", negative="")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def unit(seed, dim=16):
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    return CacheStore(str(tmp_path / "index.db"), tmp_path / "blobs", dim=16, ttl_s=100, clock=clock)


def test_put_then_search_in_scope(store):
    store.put(unit(1), SCOPE, "image", b"image one", seed=7, benefit=20)
    hits = store.search(unit(1), SCOPE, "image")
    assert len(hits) == 1 and hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert store.payload(hits[0]) == b"image one"
    assert store.search(unit(1), SCOPE, "latent") == []


def test_other_fingerprint_never_served(store):
    store.put(unit(1), SCOPE, "image", b"old model's image")
    other = scope_key("model-b", size=64, steps=20, guidance=7.5, scheduler="ddim", negative="")
    assert store.search(unit(1), other, "image") == []


def test_seeded_request_sees_only_its_seed(store):
    store.put(unit(1), SCOPE, "image", b"seed 7", seed=7)
    assert [h.entry["seed"] for h in store.search(unit(1), SCOPE, "image", seed=7)] == [7]
    assert store.search(unit(1), SCOPE, "image", seed=8) == []
    assert len(store.search(unit(1), SCOPE, "image")) == 1  # no seed: any entry


def test_expired_entry_is_never_served_and_gets_purged(store, clock):
    store.put(unit(1), SCOPE, "image", b"short lived")
    clock.now += 101
    assert store.search(unit(1), SCOPE, "image") == []
    assert store.purge_expired() == 1
    assert store.entries() == [] and store.blobs.keys() == []


def test_capacity_evicts_by_policy(tmp_path, clock):
    store = CacheStore(str(tmp_path / "i.db"), tmp_path / "b", dim=16, max_entries=2, policy="lru", clock=clock)
    for i in range(3):
        clock.now += 1
        store.put(unit(i), SCOPE, "image", f"image {i}".encode())
        if i == 1:
            clock.now += 1
            store.touch(store.search(unit(0), SCOPE, "image", limit=1)[0])  # 0 is now more recent than 1
    assert sorted(store.payload(h) for h in store.search(unit(0), SCOPE, "image")) == [b"image 0", b"image 2"]
    assert store.stats()["evictions"] == 1


def test_capacity_in_bytes(tmp_path, clock):
    store = CacheStore(str(tmp_path / "i.db"), tmp_path / "b", dim=16, max_bytes=25, policy="fifo", clock=clock)
    for i in range(3):
        clock.now += 1
        store.put(unit(i), SCOPE, "image", bytes(10) + bytes([i]))
    assert store.stats()["bytes"] <= 25 and store.stats()["entries"] == 2


def test_crash_between_blob_and_index_serves_nothing_broken(store, tmp_path):
    # a crash after the blob write and before the index write: an orphan blob, no row
    orphan = store.blobs.put(b"written just before the crash")
    reopened = CacheStore(str(tmp_path / "index.db"), tmp_path / "blobs", dim=16, ttl_s=100, clock=store.clock)
    assert reopened.search(unit(3), SCOPE, "image") == []
    assert reopened.purge_expired() == 1 and orphan not in reopened.blobs.keys()


def test_row_whose_blob_is_gone_or_torn_is_dropped(store):
    store.put(unit(1), SCOPE, "image", b"will be torn")
    hit = store.search(unit(1), SCOPE, "image")[0]
    store.blobs.path(hit.entry["blob"]).write_bytes(b"torn")
    assert store.payload(hit) is None
    assert store.search(unit(1), SCOPE, "image") == []


def test_persists_across_reopen(store, tmp_path):
    store.put(unit(1), SCOPE, "latent", b"step 5 latent", step=5, benefit=5)
    reopened = CacheStore(str(tmp_path / "index.db"), tmp_path / "blobs", dim=16, ttl_s=100, clock=store.clock)
    hit = reopened.search(unit(1), SCOPE, "latent")[0]
    assert hit.entry["step"] == 5 and reopened.payload(hit) == b"step 5 latent"


def test_clear(store):
    store.put(unit(1), SCOPE, "image", b"x")
    store.clear()
    assert store.stats()["entries"] == 0 and store.blobs.keys() == []


def test_identical_images_of_different_prompts_are_two_entries(store):
    store.put(unit(1), SCOPE, "image", b"the same pixels")
    store.put(unit(2), SCOPE, "image", b"the same pixels")
    store.put(unit(2), SCOPE, "image", b"the same pixels")  # a re-put of the same entry refreshes it
    assert store.stats()["entries"] == 2 and len(store.blobs.keys()) == 1


@pytest.mark.slow
def test_eviction_scans_once_per_low_water_gap_and_pages_past_a_query_window(tmp_path, clock):
    store = CacheStore(str(tmp_path / "i.db"), tmp_path / "b", dim=16, max_entries=2000, policy="fifo", clock=clock)
    for batch in range(3):
        clock.now += 1
        store.put_many(
            [dict(vector=unit(i % 16), scope=SCOPE, kind="image", payload=f"{batch}-{i}".encode()) for i in range(800)]
        )
    # 2,400 written: one eviction, down to 95% of 2,000, of the oldest batch's entries
    assert store.evictions == 500 and store.count() == 1900
    created = [e["created"] for e in store.entries()]
    assert len(created) == 1900 and created.count(clock.now - 2) == 300  # FIFO: the first batch went first
    assert len(store.blobs.keys()) == 1900  # the evicted entries' blobs went with them
