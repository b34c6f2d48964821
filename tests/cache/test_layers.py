"""The cache layers through the in-process pipeline, on the tiny engines and a real milvus-lite index."""

import numpy as np
import pytest
from PIL import Image

from voltacache.cache.embedders import ClipPooledEmbedder, MiniLMEmbedder
from voltacache.cache.layers import (
    NIRVANA_BANDS,
    CacheConfig,
    CacheSettings,
    RequestCache,
    checkpoint_steps,
    parse_bands,
    skip_steps,
)
from voltacache.cache.store import CacheStore
from voltacache.errors import VoltacacheError

REQUEST = dict(steps=10, scheduler="ddim", guidance=7.5)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEmbedder()


def make_cache(tmp_path, embedder, fingerprint="tiny-a"):
    store = CacheStore(str(tmp_path / "index.db"), tmp_path / "blobs", dim=embedder.dim, embedder=embedder.name)
    return RequestCache(store, embedder, fingerprint)


def test_k_follows_the_similarity_band():
    config = CacheConfig()
    assert [skip_steps(s, 50, config) for s in (0.99, 0.94, 0.90, 0.87, 0.80, 0.79)] == [10, 10, 10, 5, 5, 0]
    assert checkpoint_steps(50, config) == {5, 10}
    nirvana = CacheConfig(bands=parse_bands(NIRVANA_BANDS))
    assert [skip_steps(s, 50, nirvana) for s in (0.99, 0.94, 0.91, 0.87, 0.82, 0.76, 0.7)] == [25, 25, 20, 15, 10, 5, 0]
    assert checkpoint_steps(50, nirvana) == {5, 10, 15, 20, 25}
    assert checkpoint_steps(10, nirvana) == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("text", ["0.9", "0.9:0.2:1", "high:0.2", "1.5:0.2", "0.9:1.0", "0.9:0"])
def test_bad_bands_are_refused_by_name(text):
    with pytest.raises(VoltacacheError, match="cache band"):
        parse_bands(text)


def test_settings_survive_the_round_trip_through_triton_parameters(tmp_path):
    """The denoiser rebuilds its cache from the strings in its config.pbtxt: every type comes back."""
    settings = CacheSettings(
        str(tmp_path / "index.db"),
        "minilm",
        "s3://bucket/prefix",
        ttl_s=60.5,
        max_entries=7,
        semantic_threshold=0.9,
        bands="0.95:0.25,0.85:0.1",
    )
    parameters = settings.parameters()
    assert all(isinstance(v, str) for v in parameters.values())
    assert CacheSettings.from_parameters(parameters) == settings
    assert CacheSettings.from_parameters({}) == CacheSettings()


def test_exact_repeat_is_a_semantic_hit(sd, tmp_path):
    cache = make_cache(tmp_path, ClipPooledEmbedder(64))
    first = sd("a lighthouse at dusk", seed=3, cache=cache, **REQUEST)
    second = sd("a lighthouse at dusk", seed=3, cache=cache, **REQUEST)
    assert (first.cache, second.cache) == ("miss", "semantic")
    assert second.similarity == pytest.approx(1.0, abs=1e-4)
    assert second.stats.steps == 0 and second.stats.unet_deep_calls == 0
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert second.stats.text_memo_hits == 1  # the exact prompt also skipped the text encoder


def test_seed_scoping(sd, tmp_path):
    cache = make_cache(tmp_path, ClipPooledEmbedder(64))
    sd("a lighthouse at dusk", seed=3, cache=cache, **REQUEST)
    assert sd("a lighthouse at dusk", seed=4, cache=cache, **REQUEST).cache != "semantic"
    unseeded = sd("a lighthouse at dusk", seed=None, cache=cache, **REQUEST)
    assert unseeded.cache == "semantic" and unseeded.seed in (3, 4)


def test_other_parameters_or_model_never_hit(sd, tmp_path):
    cache = make_cache(tmp_path, ClipPooledEmbedder(64))
    sd("a lighthouse at dusk", seed=3, cache=cache, **REQUEST)
    assert sd("a lighthouse at dusk", seed=3, cache=cache, **{**REQUEST, "guidance": 5.0}).cache == "miss"
    assert sd("a lighthouse at dusk", seed=3, cache=cache, negative_prompt="fog", **REQUEST).cache == "miss"
    other_model = RequestCache(cache.store, cache.embedder, "tiny-b")
    assert sd("a lighthouse at dusk", seed=3, cache=other_model, **REQUEST).cache == "miss"


def test_off_bypasses_and_refresh_regenerates(sd, tmp_path):
    cache = make_cache(tmp_path, ClipPooledEmbedder(64))
    off = sd("a lighthouse at dusk", seed=3, cache=cache, cache_mode="off", **REQUEST)
    assert off.cache == "off" and cache.store.stats()["entries"] == 0
    again = sd("a lighthouse at dusk", seed=3, cache=cache, cache_mode="off", **REQUEST)
    assert again.stats.text_memo_hits == 0  # nor the text-embedding memo
    sd("a lighthouse at dusk", seed=3, cache=cache, **REQUEST)
    refreshed = sd("a lighthouse at dusk", seed=3, cache=cache, cache_mode="refresh", **REQUEST)
    assert refreshed.cache == "miss" and refreshed.stats.steps == 10


def test_paraphrase_hits_unrelated_misses_subject_change_never_served(sd, tmp_path, minilm):
    cache = make_cache(tmp_path, minilm)
    sd("a photo of an astronaut riding a horse", seed=1, cache=cache, **REQUEST)
    sd("a dog on a windowsill", seed=1, cache=cache, **REQUEST)
    paraphrase = sd("an astronaut riding a horse, photograph", seed=1, cache=cache, **REQUEST)
    assert paraphrase.cache == "semantic" and paraphrase.similarity > 0.95
    assert sd("a bowl of fruit on a table", seed=1, cache=cache, **REQUEST).cache == "miss"
    near_miss = sd("a cat on a windowsill", seed=1, cache=cache, **REQUEST)
    assert near_miss.cache != "semantic"


def test_similar_prompt_starts_from_a_stored_latent(sd, tmp_path, minilm):
    cache = make_cache(tmp_path, minilm)
    sd("a red circle on a blue background", seed=2, cache=cache, **REQUEST)
    approximate = sd("a red circle on a green background", seed=2, cache=cache, **REQUEST)
    k = skip_steps(approximate.similarity, 10, CacheConfig())
    assert approximate.cache == "approximate" and k > 0
    assert approximate.stats.steps == 10 - k  # only the remaining steps ran, with its own embeddings
    assert cache.counts["steps_skipped"] == k


def test_img2img_is_cached_per_init_image_and_starts_from_a_stored_latent(sd, tmp_path, minilm):
    cache = make_cache(tmp_path, minilm)
    rng = np.random.default_rng(0)
    init_a, init_b = (Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2))
    request = dict(REQUEST, strength=0.6)  # 6 of the 10 steps run
    first = sd("a red circle on a blue background", seed=2, cache=cache, init_image=init_a, **request)
    repeat = sd("a red circle on a blue background", seed=2, cache=cache, init_image=init_a, **request)
    assert (first.cache, repeat.cache) == ("miss", "semantic")
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(repeat.images[0]))
    assert sd("a red circle on a blue background", seed=2, cache=cache, init_image=init_b, **request).cache == "miss"
    similar = sd("a red circle on a green background", seed=2, cache=cache, init_image=init_a, **request)
    k = skip_steps(similar.similarity, 6, CacheConfig())
    assert similar.cache == "approximate" and k > 0 and similar.stats.steps == 6 - k
