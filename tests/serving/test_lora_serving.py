"""LoRA through a real tritonserver: the deployment's registered LoRAs (conftest's cached_server), the
same image as in process, the cache scoped by LoRA, bad requests answered while the server serves on."""

import json

import numpy as np
import pytest
from helpers import cli
from PIL import Image

from voltacache.errors import VoltacacheError
from voltacache.pipeline.lora import LoraFile
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.request import Request
from voltacache.serving import protocol as p
from voltacache.serving.client import Client

from .test_triton import metric

PROMPT = "a lighthouse drawn in ink"  # this module's own: the shared cache holds none of it
REQUEST = dict(steps=6, scheduler="ddim", seed=4)


@pytest.fixture(scope="module")
def local(engines_dir, lora_files):
    files = {name: LoraFile.open(name, lora_files[name]) for name in ("style", "other")}
    return StableDiffusion.from_engines(engines_dir, loras=files)


def test_served_lora_image_equals_in_process(cached_server, local):
    client = Client(cached_server.grpc_url)
    switches = metric(cached_server, "voltacache_lora_switches_total")
    for loras in ((("style", 0.7),), (("style", 0.5), ("other", 1.0))):
        served = client.generate(PROMPT, cache_mode="off", loras=loras, **REQUEST)
        expected = local(PROMPT, cache_mode="off", loras=loras, **REQUEST)
        assert np.array_equal(served.images[0], np.asarray(expected.images[0]))
    base = client.generate(PROMPT, cache_mode="off", **REQUEST)
    assert np.array_equal(base.images[0], np.asarray(local(PROMPT, cache_mode="off", **REQUEST).images[0]))
    assert metric(cached_server, "voltacache_lora_switches_total") > switches
    assert metric(cached_server, "voltacache_lora_switch_seconds_total") > 0


def test_a_lora_request_never_receives_the_base_or_another_loras_image(cached_server):
    client = Client(cached_server.grpc_url)
    prompt = "a lighthouse drawn in ink at dusk"
    base = client.generate(prompt, **REQUEST)
    styled = client.generate(prompt, loras=(("style", 1.0),), **REQUEST)
    other = client.generate(prompt, loras=(("other", 1.0),), **REQUEST)
    assert {base.cache, styled.cache, other.cache} == {"miss"}
    assert not np.array_equal(base.images, styled.images) and not np.array_equal(styled.images, other.images)
    again = client.generate(prompt + " ", loras=(("style", 1.0),), **REQUEST)  # not an exact repeat
    assert again.cache == "semantic" and np.array_equal(again.images, styled.images)


@pytest.mark.parametrize(
    "loras, message",
    [
        ([b"nope:1.0"], r"lora 'nope': not registered here \(registered: other, style\)"),
        ([b"style:99"], "lora style scale 99.0: must be a number"),
        ([b"style:1", b"style:0.5"], "names one LoRA twice"),
        ([b"style:x:y"], "a name is letters, digits"),
    ],
)
def test_bad_lora_requests_get_an_error_and_the_server_serves_on(cached_server, loras, message):
    """Sent as raw tensors, past the client's own checks: the server's answer."""
    client = Client(cached_server.grpc_url)
    tensors = {**Request.of(PROMPT, **REQUEST).to_triton(), p.LORAS: np.array(loras, dtype=object)}
    with pytest.raises(VoltacacheError, match=message):
        client.infer(p.TXT2IMG, tensors, [p.IMAGES])
    assert client.generate(PROMPT, steps=2, seed=1).images.shape[0] == 1


def test_cli_generates_with_a_registered_lora_through_the_server(cached_server, local, tmp_path):
    out = tmp_path / "ink.png"
    args = ("generate", PROMPT, "--url", cached_server.grpc_url, "--steps", "6", "--scheduler", "ddim", "--seed", "4")
    result = cli(*args, "--cache", "off", "--lora", "style:0.7", "--json", "--output", out)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["loras"] == [["style", 0.7]]
    expected = local(PROMPT, cache_mode="off", loras=(("style", 0.7),), **REQUEST)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected.images[0]))


def test_a_lora_request_runs_the_text_encoder_once(cached_server, local):
    """The ensemble hands the request's LoRAs to its text encoder, which encodes with their variant: the
    denoiser no longer encodes the prompt a second time (Triton's own statistics count the executions)."""
    client = Client(cached_server.grpc_url)

    def encoder_runs() -> int:
        stats = client.client.get_inference_statistics("text_encoder", as_json=True)
        return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))

    before = encoder_runs()
    prompt = "a text encoder counted once, with a lora"  # new: the encoder's response cache has none of it
    served = client.generate(prompt, cache_mode="off", loras=(("style", 0.9),), **REQUEST)
    assert encoder_runs() - before == 1
    expected = local(prompt, cache_mode="off", loras=(("style", 0.9),), **REQUEST)
    assert np.abs(served.images[0].astype(int) - np.asarray(expected.images[0], int)).max() <= 1
