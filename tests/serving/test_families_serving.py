"""SDXL through the real tritonserver: two tokenizers and text encoders in the ensemble, the size
conditioning on the wire, the same images as in process; and SD 1.5's deployment refusing it."""

import numpy as np
import pytest

from voltacache.benchmark import free_port
from voltacache.errors import VoltacacheError
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.serving import protocol as p
from voltacache.serving.client import Client

PROMPT = "a photo of an astronaut riding a horse"

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def xl(sdxl_tiny, tmp_path_factory):
    """(client of a served sdxl-tiny deployment, the same engines in process)."""
    from voltacache.serving.deploy import deploy
    from voltacache.serving.server import TritonServer

    engines = sdxl_tiny[1]
    root = tmp_path_factory.mktemp("xl-triton")
    repo = deploy(engines, root / "repo")
    ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    with TritonServer(repo, log_file=root / "tritonserver.log", **ports) as server:
        yield Client(server.grpc_url), StableDiffusion.from_engines(engines)


@pytest.mark.parametrize(
    "fields",
    [
        dict(scheduler="euler"),
        dict(scheduler="dpm++2m", negative_prompt="blurry", cache_interval=3),
        dict(scheduler="ddim", original_size=(32, 48), crop_top_left=(8, 4), target_size=(64, 32)),
        dict(scheduler="ddim", init_image=np.full((40, 56, 3), 90, np.uint8), strength=0.5),
    ],
)
def test_served_sdxl_equals_in_process(xl, fields):
    client, sd = xl
    served = client.generate(PROMPT, steps=6, seed=3, cache_mode="off", **fields)
    local = sd(PROMPT, steps=6, seed=3, cache_mode="off", **fields)
    assert np.array_equal(served.images[0], np.asarray(local.images[0]))
    assert served.unet_deep_calls == local.stats.unet_deep_calls


def test_served_size_conditioning_changes_the_image_and_scopes_the_exact_cache(xl):
    client, _ = xl
    plain = client.generate(PROMPT, steps=4, seed=5, scheduler="ddim")
    conditioned = client.generate(PROMPT, steps=4, seed=5, scheduler="ddim", original_size=(32, 32))
    again = client.generate(PROMPT, steps=4, seed=5, scheduler="ddim", original_size=(32, 32))
    assert not np.array_equal(plain.images, conditioned.images)
    assert conditioned.cache != "exact" and again.cache == "exact"  # Triton's cache keys on every input
    assert np.array_equal(again.images, conditioned.images)


def test_malformed_size_conditioning_fails_alone(xl):
    client, _ = xl
    values = {**client_request(), p.ORIGINAL_SIZE: np.array([64, 64, 64], np.int32)}
    with pytest.raises(VoltacacheError, match=r"unexpected shape for input 'ORIGINAL_SIZE'.*Expected \[2\], got \[3\]"):
        client.infer(p.TXT2IMG, values, [p.IMAGES])
    with pytest.raises(VoltacacheError, match=r"crop_top_left -1: must be an integer from 0"):
        client.infer(p.TXT2IMG, {**client_request(), p.CROP_TOP_LEFT: np.array([-1, 0], np.int32)}, [p.IMAGES])
    assert client.generate(PROMPT, steps=2, seed=1).images.shape == (1, 64, 64, 3)  # still serving


def test_sd15_deployment_refuses_size_conditioning(triton):
    client = Client(triton.grpc_url)
    with pytest.raises(VoltacacheError, match="original_size: size conditioning is SDXL's; this is an SD 1.x model"):
        client.generate(PROMPT, steps=2, seed=1, original_size=(64, 64))


def client_request():
    from voltacache.request import Request

    return Request(PROMPT, steps=2, seed=1, scheduler="ddim").to_triton()
