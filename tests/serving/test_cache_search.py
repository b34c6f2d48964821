"""The cache's search API through a real tritonserver: the cache_search model, which the denoiser
answers (it holds the milvus-lite index), and Client.search / recommend / cache_list."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import OTHER_MODELS_PROMPT

from voltacache.cache.search import SearchQuery
from voltacache.errors import VoltacacheError
from voltacache.serving import protocol as p
from voltacache.serving.client import Client
from voltacache.serving.deploy import CacheSettings, deploy
from voltacache.serving.server import TritonServer

REQUEST = dict(steps=4, scheduler="ddim", cache_mode="refresh")
PROMPTS = ["a lighthouse on a rocky cliff at dusk", "a red tractor in a wheat field", "a bowl of ramen with an egg"]


@pytest.fixture(scope="module")
def generated(cached_server):
    client = Client(cached_server.grpc_url)
    return {prompt: client.generate(prompt, seed=11 + i, **REQUEST) for i, prompt in enumerate(PROMPTS)}


def test_an_empty_cache_answers_with_nothing(engines_dir, tmp_path, ports):
    repo = deploy(engines_dir, tmp_path / "repo", cache=CacheSettings(index=str(tmp_path / "cache.db")))
    with TritonServer(repo, **ports) as server:
        client = Client(server.grpc_url)
        assert client.search("a red circle") == []
        assert client.recommend("a red") == []
        assert client.cache_list() == [] and client.cache_list("most-used") == []


def test_search_returns_this_models_entries_in_similarity_order_with_the_stored_images(cached_server, generated):
    client = Client(cached_server.grpc_url)
    found = client.search("a lighthouse on a rocky cliff at dusk", top=9)
    assert found[0].prompt == PROMPTS[0] and found[0].similarity == pytest.approx(1.0, abs=1e-4)
    similarities = [f.similarity for f in found]
    assert similarities == sorted(similarities, reverse=True)
    stored = generated[PROMPTS[0]]
    assert (found[0].image == stored.images[0]).all() and found[0].seed == stored.seed
    assert found[0].params["steps"] == 4 and found[0].params["width"] == stored.images.shape[2]
    # another model's entry, planted in the same index, is never shown
    assert OTHER_MODELS_PROMPT not in [f.prompt for f in client.search(OTHER_MODELS_PROMPT, top=100)]
    thumbnails = client.search(PROMPTS[1], top=2, thumbnail=16)
    assert thumbnails[0].prompt == PROMPTS[1] and max(thumbnails[0].image.shape[:2]) == 16


def test_recommendations_are_distinct_stored_prompts_nearest_a_partial_one(cached_server, generated):
    client = Client(cached_server.grpc_url)
    client.generate(PROMPTS[2], seed=99, **REQUEST)  # the same prompt stored twice: recommended once
    found = client.recommend("ramen bowl", top=3)
    assert found[0].prompt == PROMPTS[2] and all(f.image is None for f in found)
    assert len({f.prompt for f in found}) == len(found)
    assert OTHER_MODELS_PROMPT not in [f.prompt for f in client.recommend("astronaut riding", top=100)]


def test_listing_newest_first(cached_server, generated):
    found = Client(cached_server.grpc_url).cache_list("newest", top=100)
    created = [f.created for f in found]
    assert created == sorted(created, reverse=True) and set(PROMPTS) <= {f.prompt for f in found}


@pytest.mark.parametrize(
    "values, words",
    [
        ({p.SEARCH: "bogus", p.QUERY: "x"}, "mode"),
        ({p.SEARCH: "images", p.QUERY: " "}, "query is empty"),
        ({p.SEARCH: "images", p.QUERY: "x", p.TOP_K: 0}, "top"),
        ({p.SEARCH: "images", p.QUERY: "x", p.THUMBNAIL: -3}, "thumbnail"),
        ({p.QUERY: "x"}, "SEARCH"),
    ],
)
def test_malformed_searches_get_an_error_and_the_server_keeps_serving(cached_server, values, words):
    client = Client(cached_server.grpc_url)
    tensors = {
        name: np.array([v.encode() if isinstance(v, str) else v], dtype=object if isinstance(v, str) else np.int32)
        for name, v in values.items()
    }
    inputs = client.inputs(tensors)
    with pytest.raises(Exception, match=words) as caught:
        client.client.infer(p.CACHE_SEARCH, inputs, outputs=[grpcclient.InferRequestedOutput(p.RESULTS)])
    assert "Traceback" not in str(caught.value)
    assert isinstance(client.search(SearchQuery("newest", top=1)), list)  # still serving


def test_a_deployment_without_a_cache_says_so(triton):
    with pytest.raises(VoltacacheError, match="keeps no cache.*--cache"):
        Client(triton.grpc_url).search("a red circle")


def test_cli_search_through_the_server_as_in_process(cached_server, generated, tmp_path):
    from helpers import cli

    out = tmp_path / "found"
    result = cli("cache", "search", PROMPTS[0], "--url", cached_server.grpc_url, "--top", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].endswith(PROMPTS[0]) and (out / "search.json").is_file()
    listed = cli("cache", "list", "--url", cached_server.grpc_url, "--order", "most-used", "--top", 3)
    assert listed.exit_code == 0 and len(listed.stdout.splitlines()) == 3


def test_ui_refuses_a_server_that_does_not_answer_and_a_busy_port(cached_server, new_port):
    from helpers import cli, one_error_line

    one_error_line(cli("ui", "--url", f"127.0.0.1:{new_port()}"), 1, "--url", "no voltacache server answers")
    busy = int(cached_server.http_url.rsplit(":", 1)[1])
    one_error_line(cli("ui", "--url", cached_server.grpc_url, "--port", busy), 2, f"--port {busy} is in use")
