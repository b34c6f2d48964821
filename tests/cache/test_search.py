"""Browsing the cache in process: voltacache.cache.search on a real milvus-lite index."""

import numpy as np
import pytest

from voltacache.cache.embedders import ClipPooledEmbedder
from voltacache.cache.layers import RequestCache, to_bytes
from voltacache.cache.search import Found, SearchQuery, from_triton, search, to_triton
from voltacache.cache.store import CacheStore, scope_key
from voltacache.errors import InvalidRequest

from .test_store import Clock, unit

MODEL, OTHER = "model-a", "model-b"


def pixels(value, side=8):
    return np.full((1, side, side, 3), value, np.uint8)


@pytest.fixture
def cache(tmp_path):
    clock = Clock()
    store = CacheStore(str(tmp_path / "index.db"), tmp_path / "blobs", dim=16, ttl_s=100, clock=clock)
    with store:
        yield RequestCache(store, ClipPooledEmbedder(16), MODEL)


def put(cache, vector, prompt, value, model=MODEL, seed=1, hits=0):
    """One generation's image entry, as RequestCache.remember stores it (its checkpoint latents too)."""
    entry = dict(vector=vector, scope=scope_key(model, steps=10), model=model, prompt=prompt, params={"steps": 10})
    ids = cache.store.put_many(
        [
            dict(entry, kind="image", payload=to_bytes(pixels(value)), seed=seed, step=10),
            dict(entry, kind="latent", payload=to_bytes(np.zeros(4, np.float32)), step=2),
        ]
    )
    cache.store.clock.now += 1
    return ids[0]


def near(seed, distance):
    """A unit vector `distance` away from unit(seed), in a random direction."""
    v = unit(seed) + distance * unit(seed + 100)
    return v / np.linalg.norm(v)


def test_empty_cache_finds_nothing(cache):
    for mode in ("images", "prompts", "newest", "most-used"):
        assert search(cache, SearchQuery(mode, "a red circle"), unit(1)) == []


def test_images_of_this_model_only_in_similarity_order_with_the_stored_pixels(cache):
    put(cache, near(1, 0.5), "far", 10)
    put(cache, unit(1), "exact", 20, seed=7)
    put(cache, near(1, 0.2), "close", 30)
    put(cache, unit(1), "another model's", 40, model=OTHER)

    found = search(cache, SearchQuery("images", "query", top=9), unit(1))
    assert [f.prompt for f in found] == ["exact", "close", "far"]
    assert found[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert found[0].similarity > found[1].similarity > found[2].similarity
    assert (found[0].image == pixels(20)[0]).all() and found[0].seed == 7 and found[0].params == {"steps": 10}
    assert [f.prompt for f in search(cache, SearchQuery("images", "query", top=2), unit(1))] == ["exact", "close"]


def test_recommendations_are_distinct_prompts_without_images(cache):
    for seed in (1, 2, 3):  # the same prompt generated three times
        put(cache, unit(1), "a red circle", seed, seed=seed)
    put(cache, near(1, 0.3), "a red square", 50)
    found = search(cache, SearchQuery("prompts", "a red", top=5), unit(1))
    assert [f.prompt for f in found] == ["a red circle", "a red square"]
    assert all(f.image is None for f in found)


def test_listing_newest_and_most_used_first(cache):
    first = put(cache, unit(1), "first", 1)
    put(cache, unit(2), "second", 2)
    put(cache, unit(3), "third", 3)
    assert [f.prompt for f in search(cache, SearchQuery("newest"))] == ["third", "second", "first"]
    hit = cache.store.search(unit(1), scope_key(MODEL, steps=10), "image")[0]
    assert hit.id == first
    cache.store.touch(hit)
    assert [f.prompt for f in search(cache, SearchQuery("most-used", top=1))] == ["first"]


def test_expired_and_torn_entries_are_not_shown(cache):
    put(cache, unit(1), "kept", 1)
    torn = put(cache, unit(2), "torn", 2)
    blob = cache.store.client.get(cache.store.collection, ids=[torn])[0]["blob"]
    cache.store.blobs.path(blob).write_bytes(b"not the stored bytes")
    assert [f.prompt for f in search(cache, SearchQuery("newest"))] == ["kept"]
    cache.store.clock.now += 1000
    assert search(cache, SearchQuery("newest")) == []


def test_thumbnails_keep_the_aspect_and_never_enlarge(cache):
    put(cache, unit(1), "an image", 9)
    assert search(cache, SearchQuery("newest", thumbnail=4))[0].image.shape == (4, 4, 3)
    assert search(cache, SearchQuery("newest", thumbnail=64))[0].image.shape == (8, 8, 3)


def test_results_survive_the_wire():
    found = [
        Found("a", "with image", 0.9, 1, 1000.0, 2, {"steps": 10}, pixels(5)[0]),
        Found("b", "without", 0.8, -1, 1001.0, 0, {}, None),
    ]
    back = from_triton(*to_triton(found).values())
    assert [f.record() for f in back] == [f.record() for f in found]
    assert (back[0].image == found[0].image).all() and back[1].image is None
    assert from_triton(*to_triton([]).values()) == []


@pytest.mark.parametrize(
    "query, words",
    [
        (SearchQuery("bogus", "x"), "mode"),
        (SearchQuery("images", "  "), "query is empty"),
        (SearchQuery("images", "x", top=0), "top"),
        (SearchQuery("images", "x", top=101), "top"),
        (SearchQuery("images", "x", thumbnail=-1), "thumbnail"),
    ],
)
def test_malformed_queries_are_refused_naming_the_field(query, words):
    with pytest.raises(InvalidRequest, match=words):
        query.check()


def test_a_query_round_trips_through_triton_tensors():
    query = SearchQuery("prompts", "a red círcle", 5, 64)
    tensors = query.to_triton()
    assert SearchQuery.from_triton(tensors.get) == query
    with pytest.raises(InvalidRequest, match="SEARCH"):
        SearchQuery.from_triton({}.get)


def test_a_collection_from_before_prompts_were_kept_serves_but_refuses_search(tmp_path):
    """Milvus cannot add fields to a collection: an older cache keeps serving generation, and a
    search says how to get a searchable one."""
    from pymilvus import DataType, MilvusClient

    from voltacache.cache.store import FIELDS, collection_name, release_lite_server
    from voltacache.errors import CacheUnavailable

    index = str(tmp_path / "old.db")
    client = MilvusClient(index)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=16)
    for name in FIELDS[1:]:
        if name in ("scope", "kind", "blob"):
            schema.add_field(name, DataType.VARCHAR, max_length=64)
        else:
            numbers = DataType.DOUBLE if name in ("created", "expires", "last_access", "benefit") else DataType.INT64
            schema.add_field(name, numbers)
    params = client.prepare_index_params()
    params.add_index("vector", index_type="FLAT", metric_type="COSINE")
    client.create_collection(collection_name("clip", 16), schema=schema, index_params=params)
    client.close()
    release_lite_server(index)

    with CacheStore(index, tmp_path / "blobs", dim=16, clock=Clock()) as store:
        cache = RequestCache(store, ClipPooledEmbedder(16), MODEL)
        put(cache, unit(1), "an old entry", 1)  # generation still stores and finds
        assert store.search(unit(1), scope_key(MODEL, steps=10), "image")[0].entry["seed"] == 1
        with pytest.raises(CacheUnavailable, match="cache clear"):
            search(cache, SearchQuery("images", "x"), unit(1))
