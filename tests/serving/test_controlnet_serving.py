"""ControlNet through the real tritonserver (issue 33): every ControlNet of the engines is a model of the
repository, the request names them with CONTROLNETS and carries CONTROL_IMAGE (optional inputs of every
ensemble), the image equals in process, controlled and plain requests in flight together each equal their own,
the metrics count ControlNet calls, and a ControlNet the engines lack is a bad request while the server serves on."""

import threading
import urllib.request

import numpy as np
import pytest

from voltacache.benchmark import free_port
from voltacache.errors import VoltacacheError
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.serving.client import Client

PROMPT = "a photo of an astronaut riding a horse"
CONTROL = np.random.default_rng(3).integers(0, 256, (48, 40, 3), dtype=np.uint8)
OTHER = np.random.default_rng(4).integers(0, 256, (48, 40, 3), dtype=np.uint8)
INIT = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def served(controlled, tmp_path_factory):
    """(client of a served deployment with two ControlNets, the same engines in process, the server)."""
    from voltacache.serving.deploy import deploy
    from voltacache.serving.server import TritonServer

    root = tmp_path_factory.mktemp("controlnet-triton")
    repo = deploy(controlled, root / "repo")
    assert (repo / "controlnet_canny" / "config.pbtxt").is_file() and (repo / "controlnet_depth").is_dir()
    ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    with TritonServer(repo, log_file=root / "tritonserver.log", **ports) as server:
        yield Client(server.grpc_url), StableDiffusion.from_engines(controlled), server


@pytest.mark.parametrize(
    "fields",
    [
        dict(controlnets={"canny": 0.8}, control_images=CONTROL, cache_interval=3),
        dict(controlnets={"canny": 0.8, "depth": 0.5}, control_images=[CONTROL, OTHER], control_start=0.2),
        dict(controlnets={"depth": 1.2}, control_images=CONTROL, cache_interval=2, control_residuals="fresh"),
        dict(controlnets={"canny": 1.0}, control_images=CONTROL, init_image=INIT, strength=0.7),
    ],
)
def test_served_equals_in_process(served, fields):
    client, sd, _ = served
    request = dict(steps=6, seed=3, scheduler="ddim", cache_mode="off", **fields)
    remote, local = client.generate(PROMPT, **request), sd(PROMPT, **request)
    assert np.array_equal(remote.images[0], np.asarray(local.images[0]))
    assert remote.controlnet_calls == local.report().controlnet_calls > 0


def test_controlled_and_plain_requests_in_flight_each_equal_their_own(served):
    client, sd, server = served
    requests = {
        "canny": dict(controlnets={"canny": 1.0}, control_images=CONTROL),
        "plain": dict(),
        "depth": dict(controlnets={"depth": 0.7}, control_images=OTHER),
    }
    results = {}

    def generate(name):
        results[name] = Client(client.url).generate(
            PROMPT, steps=8, seed=5, scheduler="ddim", cache_mode="off", **requests[name]
        )

    threads = [threading.Thread(target=generate, args=(name,)) for name in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, fields in requests.items():
        local = sd(PROMPT, steps=8, seed=5, scheduler="ddim", cache_mode="off", **fields)
        assert np.array_equal(results[name].images[0], np.asarray(local.images[0])), name
    metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    calls = [line for line in metrics.splitlines() if line.startswith("voltacache_controlnet_calls_total")]
    assert calls and float(calls[0].split()[-1]) >= 16


def test_an_unknown_controlnet_is_a_bad_request_and_the_server_serves_on(served):
    client, _, _ = served
    with pytest.raises(VoltacacheError, match="controlnet 'openpose': these engines have no ControlNet of that name"):
        client.generate(PROMPT, steps=2, seed=1, controlnets={"openpose": 1.0}, control_images=CONTROL)
    with pytest.raises(VoltacacheError, match="control_image: 2 given for 1 ControlNets"):
        client.generate(PROMPT, steps=2, seed=1, controlnets={"canny": 1.0}, control_images=[CONTROL, OTHER])
    assert client.generate(PROMPT, steps=2, seed=1).images.shape == (1, 64, 64, 3)
