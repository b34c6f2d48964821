"""Against the real tritonserver (one per session): images, concurrency, bad requests, metrics, cache."""

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from voltacache.errors import InvalidRequest, UsageError, VoltacacheError
from voltacache.request import Request
from voltacache.serving import protocol as p
from voltacache.serving.client import Client

PROMPT = "a photo of an astronaut riding a horse"


def metric(server, name, model=None, **labels):
    """The sum of a metric's samples whose labels include the given ones."""
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    wanted = [f'{key}="{value}"' for key, value in ({"model": model} if model else {}).items() | labels.items()]
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(w in line for w in wanted)
    ]
    return sum(values)


def valid(prompt=PROMPT, **overrides):
    values = {
        p.PROMPT: np.array([prompt.encode()], dtype=object),
        p.NEGATIVE_PROMPT: np.array([b""], dtype=object),
        p.STEPS: np.array([4], np.int32),
        p.GUIDANCE: np.array([7.5], np.float32),
        p.SEED: np.array([1], np.int64),
        p.SCHEDULER: np.array([b"ddim"], dtype=object),
        p.CACHE_INTERVAL: np.array([2], np.int32),
        p.CACHE_SCHEDULE: np.array([b"uniform"], dtype=object),
        p.CACHE: np.array([b"on"], dtype=object),
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


@pytest.mark.parametrize(
    "protocol, seed, schedule",
    [("grpc", 11, "uniform"), ("http", 12, "nonuniform"), ("grpc", 13, "calibrated"), ("http", 14, "adaptive")],
)
def test_served_image_equals_in_process(triton, sd, protocol, seed, schedule):
    """Every DeepCache schedule: the denoiser reads the engines' calibration as the pipeline does."""
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    request = dict(steps=12, seed=seed, scheduler="ddim", cache_interval=3, cache_schedule=schedule)
    if schedule == "adaptive":
        request.update(cache_interval=1, refresh_threshold=0.05)
    served = Client(url, protocol).generate(PROMPT, **request)
    local = sd(PROMPT, **request)
    assert np.array_equal(served.images[0], np.asarray(local.images[0]))
    stats = local.stats
    assert (served.unet_deep_calls, served.unet_shallow_calls, served.steps_computed) == (
        stats.unet_deep_calls,
        stats.unet_shallow_calls,
        12,
    )
    assert served.unet_deep_calls == (4 if schedule in ("uniform", "calibrated") else stats.unet_deep_calls)


def test_img2img_served_equals_in_process(triton, sd):
    init = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    served = Client(triton.grpc_url).generate(PROMPT, steps=10, seed=4, scheduler="ddim", init_image=init, strength=0.5)
    from PIL import Image

    local = sd(PROMPT, steps=10, seed=4, scheduler="ddim", init_image=Image.fromarray(init), strength=0.5)
    assert served.steps_computed == 5
    assert np.array_equal(served.images[0], np.asarray(local.images[0]))


def test_concurrent_requests_do_not_share_deep_features(triton, sd):
    seeds = [21, 22, 23, 24]

    def served(seed):
        return Client(triton.grpc_url).generate(PROMPT, steps=9, seed=seed, scheduler="ddim", cache_interval=3)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(served, seeds))
    for seed, result in zip(seeds, results):
        serial = sd(PROMPT, steps=9, seed=seed, scheduler="ddim", cache_interval=3).images[0]
        assert np.array_equal(result.images[0], np.asarray(serial)), seed


BAD_REQUESTS = {
    "missing input": valid(**{p.PROMPT: None}),  # every other input has its default
    "wrong dtype": valid(**{p.STEPS: np.array([4.0], np.float32)}),
    "wrong shape": valid(**{p.STEPS: np.array([4, 4], np.int32)}),
    "empty prompt": valid(""),
    "huge prompt": valid("a " * 5000),
    "invalid utf-8": valid(**{p.PROMPT: np.array([b"\xff\xfe bad"], dtype=object)}),
    "zero steps": valid(**{p.STEPS: np.array([0], np.int32)}),
    "absurd steps": valid(**{p.STEPS: np.array([10**6], np.int32)}),
    "nan guidance": valid(**{p.GUIDANCE: np.array([np.nan], np.float32)}),
    "unknown scheduler": valid(**{p.SCHEDULER: np.array([b"heun-9000"], dtype=object)}),
    "zero cache interval": valid(**{p.CACHE_INTERVAL: np.array([0], np.int32)}),
    "unknown cache mode": valid(**{p.CACHE: np.array([b"sometimes"], dtype=object)}),
    "huge guidance": valid(**{p.GUIDANCE: np.array([1e30], np.float32)}),
    "negative seed": valid(**{p.SEED: np.array([-5], np.int64)}),
    "control characters": valid("a\x00b"),
    "uncalibrated step count": valid(**{p.CACHE_SCHEDULE: np.array([b"calibrated"], dtype=object)}),
    "threshold without adaptive": valid(**{p.REFRESH_THRESHOLD: np.array([0.2], np.float32)}),
    "negative threshold": valid(
        **{
            p.CACHE_SCHEDULE: np.array([b"adaptive"], dtype=object),
            p.CACHE_INTERVAL: np.array([1], np.int32),
            p.REFRESH_THRESHOLD: np.array([-1.0], np.float32),
        }
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_malformed_request_gets_an_error_and_the_server_keeps_serving(triton, case):
    """INVALID_ARG, not INTERNAL: the client raises InvalidRequest (exit 2 from the CLI), as in process."""
    client = Client(triton.grpc_url, timeout_s=30)
    started = time.monotonic()
    with pytest.raises(InvalidRequest):
        client.infer(p.TXT2IMG, BAD_REQUESTS[case], [p.IMAGES])
    assert time.monotonic() - started < 10
    out = client.infer(p.TXT2IMG, valid(**{p.SEED: np.array([int(time.time_ns() % 10**9)], np.int64)}), [p.IMAGES])
    assert out[p.IMAGES].shape == (1, 64, 64, 3)


def test_metrics_count_unet_calls(triton):
    before = {
        n: metric(triton, n, "denoiser")
        for n in (
            "voltacache_requests_total",
            "voltacache_unet_deep_calls_total",
            "voltacache_unet_shallow_calls_total",
            "voltacache_steps_total",
        )
    }
    Client(triton.grpc_url).generate(
        "a metrics probe", steps=10, seed=int(time.time()), scheduler="ddim", cache_interval=5
    )
    assert metric(triton, "voltacache_requests_total", "denoiser") == before["voltacache_requests_total"] + 1
    assert (
        metric(triton, "voltacache_unet_deep_calls_total", "denoiser") == before["voltacache_unet_deep_calls_total"] + 2
    )
    assert (
        metric(triton, "voltacache_unet_shallow_calls_total", "denoiser")
        == before["voltacache_unet_shallow_calls_total"] + 8
    )
    assert metric(triton, "voltacache_steps_total", "denoiser") == before["voltacache_steps_total"] + 10


def test_exact_duplicate_is_a_response_cache_hit_and_says_so(triton):
    client = Client(triton.grpc_url)
    hits = metric(triton, "nv_cache_num_hits_per_model", p.DENOISER)
    first = client.generate("a cached request", steps=6, seed=99, scheduler="ddim")
    second = client.generate("a cached request", steps=6, seed=99, scheduler="ddim")
    assert np.array_equal(first.images, second.images) and first.seed == second.seed == 99
    assert metric(triton, "nv_cache_num_hits_per_model", p.DENOISER) == hits + 1
    assert (first.cache, first.steps_computed, first.unet_deep_calls) == ("off", 6, 6)  # no cross-request cache here
    assert (second.cache, second.steps_computed, second.unet_deep_calls, second.similarity) == ("exact", 0, 0, 1.0)
    assert metric(triton, "voltacache_cache_requests_total", p.POSTPROCESS, layer="exact") >= 1


@pytest.mark.parametrize("mode", ["off", "refresh"])
def test_cache_off_or_refresh_is_never_answered_from_the_response_cache(triton, mode):
    client = Client(triton.grpc_url)
    hits = metric(triton, "nv_cache_num_hits_per_model", p.DENOISER)
    results = [client.generate(f"an uncached {mode} request", steps=3, seed=5, cache_mode=mode) for _ in range(2)]
    assert metric(triton, "nv_cache_num_hits_per_model", p.DENOISER) == hits
    assert [r.steps_computed for r in results] == [3, 3]


def test_random_seeds_are_drawn_by_the_server_and_never_repeat(triton):
    client = Client(triton.grpc_url)
    seeds = {client.generate("a random request", steps=2, scheduler="ddim").seed for _ in range(2)}
    assert len(seeds) == 2


def test_init_image_of_another_size_is_resized_as_in_process(triton, sd):
    init = np.random.default_rng(2).integers(0, 255, (128, 96, 3), dtype=np.uint8)
    served = Client(triton.grpc_url).generate(PROMPT, steps=6, seed=3, scheduler="ddim", init_image=init, strength=0.5)
    local = sd(PROMPT, steps=6, seed=3, scheduler="ddim", init_image=init, strength=0.5)
    assert np.array_equal(served.images[0], np.asarray(local.images[0]))


def test_same_prompt_limit_served_and_in_process(triton, sd):
    long = "a " * 3000  # 6000 bytes
    with pytest.raises(VoltacacheError, match="prompt is 6000 bytes"):
        sd(long, steps=2)
    with pytest.raises(VoltacacheError, match="prompt is 6000 bytes"):
        Client(triton.grpc_url).generate(long, steps=2)  # checked at the edge
    with pytest.raises(VoltacacheError, match="PROMPT|prompt"):  # and again by the server, for any client
        Client(triton.grpc_url).infer(p.TXT2IMG, valid(long), [p.IMAGES])


def test_server_binds_loopback_only(triton):
    assert all(f"--{kind}-address=127.0.0.1" in triton.command()[0] for kind in ("http", "grpc", "metrics"))
    assert re.match(r"127\.0\.0\.1:\d+", triton.grpc_url)


def test_same_prompt_other_seed_skips_the_text_encoder(triton):
    client = Client(triton.grpc_url)
    hits = metric(triton, "nv_cache_num_hits_per_model", "text_encoder")
    encoded = metric(triton, "nv_inference_exec_count", "text_encoder")
    for seed in (1, 2, 3):
        client.generate("a memoized prompt", steps=2, seed=seed, scheduler="ddim")
    assert metric(triton, "nv_cache_num_hits_per_model", "text_encoder") == hits + 2
    assert metric(triton, "nv_inference_exec_count", "text_encoder") == encoded + 1


def test_another_size_is_refused_as_in_process(triton, sd):
    from voltacache.errors import InvalidRequest

    for generate in (sd, Client(triton.grpc_url).generate, Client(triton.http_url, "http").generate):
        with pytest.raises(InvalidRequest, match="static at 64x64"):
            generate(PROMPT, steps=2, height=128)


def test_a_served_refusal_is_the_same_one_line_as_in_process(triton, engines_dir, tmp_path):
    """One prompt: its refusal is the command's (exit 2, one line, no "1 of 1 prompts failed"), served
    (INVALID_ARG from the denoiser) as in process (found in the manifest before the engines load)."""
    from helpers import cli

    args = ["generate", PROMPT, "--steps", "7", "--cache-interval", "3", "--cache-schedule", "calibrated"]
    served = cli(*args, "--url", triton.grpc_url, "-o", tmp_path / "a.png")
    local = cli(*args, "--engines", engines_dir, "-o", tmp_path / "b.png")
    for result in (served, local):
        assert result.exit_code == 2, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "calibrated for 12 steps, not 7" in lines[0], result.stderr
        assert "prompts failed" not in result.stderr
    assert not list(tmp_path.iterdir())


def test_a_wrong_port_says_which_port_it_is(triton):
    """The metrics port, or the HTTP port spoken to over gRPC: the error says what answers there, and
    is the user's mistake (exit 2), not a server failing."""
    with pytest.raises(UsageError, match="this is a Triton server's metrics port; give its gRPC port"):
        Client(f"127.0.0.1:{triton.metrics_port}").image_shape()
    with pytest.raises(UsageError, match="this is a Triton server's HTTP port; give its gRPC port"):
        Client(triton.http_url).image_shape()


def test_a_bare_v2_request_with_only_a_prompt_gets_the_defaults(triton, sd):
    """KServe v2 over HTTP/JSON, as curl or any program sends it, with PROMPT alone: the server applies
    Request's defaults (50 PNDM steps, guidance 7.5, a seed it draws and reports)."""
    import json

    body = {
        "inputs": [{"name": p.PROMPT, "shape": [1], "datatype": "BYTES", "data": [PROMPT]}],
        "outputs": [{"name": p.IMAGES}, {"name": p.SEED_USED}, {"name": p.STEPS_COMPUTED}],
    }
    url = f"http://{triton.http_url}/v2/models/{p.TXT2IMG}/infer"
    data = json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, {"Content-Type": "application/json"})) as r:
        answer = {o["name"]: o for o in json.loads(r.read())["outputs"]}
    seed, steps = answer[p.SEED_USED]["data"][0], answer[p.STEPS_COMPUTED]["data"][0]
    image = np.array(answer[p.IMAGES]["data"], np.uint8).reshape(answer[p.IMAGES]["shape"])
    assert steps == Request.steps
    expected = np.asarray(sd(Request(PROMPT, seed=seed)).images[0])
    assert np.array_equal(image[0], expected)
    # and a client of before, which sends every input, is served as it was
    old = Client(triton.grpc_url).infer(p.TXT2IMG, valid(), [p.IMAGES, p.STEPS_COMPUTED])
    assert old[p.STEPS_COMPUTED][0] == 4
