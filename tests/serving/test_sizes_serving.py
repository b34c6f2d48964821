"""An engine set of several sizes through the real tritonserver: HEIGHT and WIDTH on the wire, images of
any side in the models' configs, each size's image equal to in process, requests of two sizes in flight
together, and a size not built refused as a bad request while the server serves on."""

import threading

import numpy as np
import pytest

from voltacache.benchmark import free_port
from voltacache.errors import VoltacacheError
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.serving.client import Client

PROMPT = "a photo of an astronaut riding a horse"

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def served(sizes_engines, tmp_path_factory):
    """(client of a served deployment of several sizes, the same engines in process)."""
    from voltacache.serving.deploy import deploy
    from voltacache.serving.server import TritonServer

    root = tmp_path_factory.mktemp("sizes-triton")
    repo = deploy(sizes_engines, root / "repo")
    ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    with TritonServer(repo, log_file=root / "tritonserver.log", **ports) as server:
        yield Client(server.grpc_url), StableDiffusion.from_engines(sizes_engines)


def test_each_size_served_equals_in_process(served):
    client, sd = served
    assert client.image_shape() == (1, -1, -1)  # images of any side: the server judges the size
    for fields in (dict(), dict(height=64, width=128), dict(height=128, width=64, negative_prompt="blurry")):
        remote = client.generate(PROMPT, steps=4, seed=3, scheduler="ddim", cache_mode="off", **fields)
        local = sd(PROMPT, steps=4, seed=3, scheduler="ddim", cache_mode="off", **fields)
        assert np.array_equal(remote.images[0], np.asarray(local.images[0]))


def test_two_sizes_in_flight_step_together_and_each_equals_its_own(served):
    client, sd = served
    sizes, results = [(64, 128), (128, 64)], {}

    def generate(size):
        results[size] = Client(client.url).generate(
            PROMPT, steps=8, seed=5, scheduler="ddim", cache_mode="off", height=size[0], width=size[1]
        )

    threads = [threading.Thread(target=generate, args=(size,)) for size in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for height, width in sizes:
        local = sd(PROMPT, steps=8, seed=5, scheduler="ddim", cache_mode="off", height=height, width=width)
        assert np.array_equal(results[height, width].images[0], np.asarray(local.images[0]))


def test_a_size_not_built_is_a_bad_request_and_the_server_serves_on(served):
    client, _ = served
    with pytest.raises(VoltacacheError, match=r"size 128x128: these engines serve 64x64, 128x64, 64x128"):
        client.generate(PROMPT, steps=2, seed=1, height=128, width=128)
    assert client.generate(PROMPT, steps=2, seed=1, width=128).images.shape == (1, 64, 128, 3)
