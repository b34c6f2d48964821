"""The cache layers through a real tritonserver, with the sentence embedder on a milvus-lite file."""

from voltacache.cache.layers import CacheConfig, skip_steps
from voltacache.serving.client import Client

from .test_triton import metric

REQUEST = dict(steps=10, scheduler="ddim", seed=1)


def layer_counts(server):
    return {
        layer: metric(server, "voltacache_cache_requests_total", layer=layer)
        for layer in ("semantic", "approximate", "miss")
    }


def test_paraphrase_served_subject_change_never_served_similar_starts_k_in(cached_server):
    client = Client(cached_server.grpc_url)
    before = layer_counts(cached_server)
    skipped_before = metric(cached_server, "voltacache_cache_steps_skipped_total")
    first = client.generate("a photo of an astronaut riding a horse", **REQUEST)
    client.generate("a dog on a windowsill", **REQUEST)
    paraphrase = client.generate("an astronaut riding a horse, photograph", **REQUEST)
    near_miss = client.generate("a cat on a windowsill", **REQUEST)
    unrelated = client.generate("a bowl of fruit on a table", **REQUEST)
    similar = client.generate("a photo of an astronaut riding a pony", **REQUEST)

    assert (first.cache, first.steps_computed) == ("miss", 10)
    assert (paraphrase.cache, paraphrase.steps_computed) == ("semantic", 0) and paraphrase.similarity > 0.95
    assert (paraphrase.images == first.images).all()
    assert near_miss.cache != "semantic" and near_miss.steps_computed > 0
    assert (unrelated.cache, unrelated.steps_computed) == ("miss", 10)
    k = skip_steps(similar.similarity, 10, CacheConfig())
    assert similar.cache == "approximate" and similar.steps_computed == 10 - k > 0

    after = layer_counts(cached_server)
    results = [first, paraphrase, near_miss, unrelated, similar]
    for layer in ("semantic", "approximate", "miss"):
        made = sum(r.cache == layer for r in results) + (layer == "miss")  # + the dog
        assert after[layer] - before[layer] == made
    skipped = sum(10 - r.steps_computed for r in results)
    assert metric(cached_server, "voltacache_cache_steps_skipped_total") - skipped_before == skipped


def test_concurrent_requests_share_one_milvus_lite_file_and_the_layers_hold(cached_server):
    """The step batcher is one process: the milvus-lite file no longer limits the deployment to one
    request at a time, and misses stored while others run are found by the requests after them."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["a lighthouse on a cliff", "a red tractor in a field", "a bowl of ramen", "a snowy mountain hut"]
    before = metric(cached_server, "voltacache_tick_images_total", call="deep")
    calls = metric(cached_server, "voltacache_tick_calls_total", call="deep")

    def generate(prompt, mode="on"):
        return Client(cached_server.grpc_url).generate(prompt, cache_mode=mode, **REQUEST)

    with ThreadPoolExecutor(len(prompts)) as pool:  # refresh: computed and stored, never from Triton's cache
        first = list(pool.map(lambda prompt: generate(prompt, "refresh"), prompts))
    assert [r.cache for r in first] == ["miss"] * len(prompts)
    # they ran together: more images than deep calls
    assert metric(cached_server, "voltacache_tick_images_total", call="deep") - before > (
        metric(cached_server, "voltacache_tick_calls_total", call="deep") - calls
    )
    with ThreadPoolExecutor(len(prompts)) as pool:
        second = list(pool.map(generate, prompts))
    for stored, hit in zip(first, second):
        assert (hit.cache, hit.steps_computed, hit.seed) == ("semantic", 0, stored.seed)
        assert (hit.images == stored.images).all()
