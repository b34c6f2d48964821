"""Step batching through the real tritonserver (the session's default deployment batches steps):
concurrent requests with different settings share U-Net calls and each equals its own request served
alone; a bad one fails alone; a client that goes away frees its slot; the occupancy metrics move by
what was batched."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from voltacache.errors import VoltacacheError
from voltacache.request import Request
from voltacache.serving import protocol as p
from voltacache.serving.client import Client
from voltacache.specs import INPUT_IDS, POOLED_EMBEDDING, TEXT_EMBEDDINGS, TEXT_ENCODER

from .test_triton import metric

PROMPT = "a photo of an astronaut riding a horse"
INIT = np.random.default_rng(2).integers(0, 256, (48, 80, 3), dtype=np.uint8)
MIXED = [
    dict(steps=8, seed=101, scheduler="ddim"),
    dict(steps=6, seed=102, scheduler="euler-a", cache_interval=3),
    dict(steps=7, seed=103, scheduler="dpm++2m", guidance=3.0, cache_interval=2, cache_schedule="nonuniform"),
    dict(steps=6, seed=104, scheduler="pndm", init_image=INIT, strength=0.7),
    dict(steps=5, seed=105, scheduler="lms", cache_interval=2, negative_prompt="blurry"),
]
# Batched rows run the same ONNX Runtime kernels as a row alone; allowed 1 of 255 levels (measured: 0)
MAX_LEVELS = 1


def served(triton, fields):
    return Client(triton.grpc_url).generate(PROMPT, cache_mode="off", **fields)


def levels(a, b) -> int:
    return int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max())


def unet_images(triton) -> float:
    return sum(metric(triton, "voltacache_tick_images_total", p.DENOISER, call=c) for c in ("deep", "shallow"))


def test_concurrent_mixed_requests_share_calls_and_each_equals_it_served_alone(triton, sd):
    images, calls = unet_images(triton), metric(triton, "voltacache_tick_calls_total", p.DENOISER)
    with ThreadPoolExecutor(len(MIXED)) as pool:
        together = list(pool.map(lambda f: served(triton, f), MIXED))
    moved_images = unet_images(triton) - images
    moved_calls = metric(triton, "voltacache_tick_calls_total", p.DENOISER) - calls
    # every U-Net step of every request is counted once, in fewer calls than steps: they were batched
    steps = sum(r.unet_deep_calls + r.unet_shallow_calls for r in together)
    assert moved_images == steps
    assert moved_calls < steps
    for fields, result in zip(MIXED, together):
        alone = served(triton, fields)
        local = sd(PROMPT, cache_mode="off", **fields)
        assert levels(result.images, alone.images) <= MAX_LEVELS, fields
        assert levels(result.images[0], np.asarray(local.images[0])) <= MAX_LEVELS, fields
        assert (result.unet_deep_calls, result.unet_shallow_calls) == (
            local.stats.unet_deep_calls,
            local.stats.unet_shallow_calls,
        )


def test_a_bad_request_among_concurrent_ones_fails_alone(triton, sd):
    bad = dict(steps=10, seed=7, init_image=INIT, strength=0.01)  # leaves no denoising step
    jobs = [MIXED[0], bad, MIXED[1]]

    def outcome(fields):
        try:
            return served(triton, fields)
        except VoltacacheError as e:
            return e

    with ThreadPoolExecutor(3) as pool:
        first, error, second = pool.map(outcome, jobs)
    assert isinstance(error, VoltacacheError) and "strength" in str(error)
    for fields, result in ((MIXED[0], first), (MIXED[1], second)):
        assert levels(result.images[0], np.asarray(sd(PROMPT, cache_mode="off", **fields).images[0])) <= MAX_LEVELS


def test_a_client_that_goes_away_frees_its_slot(triton):
    """Called on the denoiser itself (as a program holding text embeddings may): a gRPC cancel reaches
    it and its slot frees at the next step. Through an ensemble, Triton 2.51 checks cancellation only
    between steps (core PR #263): a request cancelled while the denoiser runs it is not marked, so
    it runs to its end (docs/robustness.md)."""
    client = Client(triton.grpc_url)
    request = Request(PROMPT, steps=1000, seed=9, scheduler="ddim", cache_mode="off").to_triton()
    encoded = client.infer(p.TOKENIZER, request, [p.RESPONSE_KEY, INPUT_IDS])
    text = client.infer(TEXT_ENCODER, {INPUT_IDS: encoded[INPUT_IDS]}, [TEXT_EMBEDDINGS, POOLED_EMBEDDING])
    inputs = client.inputs({**request, **text, p.RESPONSE_KEY: encoded[p.RESPONSE_KEY]})
    cancelled = metric(triton, "voltacache_cancelled_requests_total", p.DENOISER)
    call = client.client.async_infer(p.DENOISER, inputs, callback=lambda *_, **__: None)
    deadline = time.monotonic() + 60
    while not _running(triton):
        assert time.monotonic() < deadline
    call.cancel()
    while metric(triton, "voltacache_cancelled_requests_total", p.DENOISER) == cancelled:
        assert time.monotonic() < deadline, "the cancelled request kept its slot"
        time.sleep(0.1)
    # nothing left in flight: 1000 steps were not run out (a tick may end after the one that counted it)
    while _running(triton):
        assert time.monotonic() < deadline, "the cancelled request kept running"
    assert served(triton, dict(steps=3, seed=5, scheduler="ddim")).steps_computed == 3


def _running(triton) -> bool:
    """Whether the denoiser has a request in flight (a tick ran since the last scrape)."""
    before = metric(triton, "voltacache_ticks_total", p.DENOISER)
    time.sleep(0.2)
    return metric(triton, "voltacache_ticks_total", p.DENOISER) > before


def test_tick_and_queue_time_are_metrics(triton):
    served(triton, dict(steps=3, seed=77, scheduler="ddim"))
    for name in ("voltacache_ticks_total", "voltacache_tick_seconds_total", "voltacache_queue_seconds_total"):
        assert metric(triton, name, p.DENOISER) > 0, name


def _ticks_after(triton, stop: float, settle: float = 1.5) -> float:
    """Ticks the denoiser ran from the moment `stop` passed until it went idle."""
    deadline = time.monotonic() + 60
    while _running(triton):
        assert time.monotonic() < deadline, "the cancelled request kept its slot"
    return metric(triton, "voltacache_ticks_total", p.DENOISER)


def test_ctrl_c_on_generate_through_the_ensemble_frees_the_slot(triton, tmp_path):
    """Triton 2.51 never tells the models inside an ensemble that its call was cancelled; `generate --url`
    names its request's id to the denoiser instead: a 1000-step request stopped after a second runs a few
    more steps, not 1000, and the metric counts it."""
    import os
    import signal
    import subprocess
    import sys

    cancelled = metric(triton, "voltacache_cancelled_requests_total", p.DENOISER)
    command = [sys.executable, "-m", "voltacache", "generate", PROMPT, "--url", triton.grpc_url, "--steps", "1000"]
    command += ["--seed", "11", "--scheduler", "ddim", "--cache", "off", "-o", str(tmp_path / "a.png")]
    child = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal starts it
    )
    deadline = time.monotonic() + 60
    while not _running(triton):
        assert time.monotonic() < deadline and child.poll() is None
    time.sleep(1)
    ticks = metric(triton, "voltacache_ticks_total", p.DENOISER)
    os.kill(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 130 and "interrupted" in err and "Traceback" not in err
    after = _ticks_after(triton, time.monotonic())
    assert after - ticks < 50, f"{after - ticks} more steps after Ctrl-C"
    assert metric(triton, "voltacache_cancelled_requests_total", p.DENOISER) == cancelled + 1
    assert not (tmp_path / "a.png").exists()


def test_a_client_that_stops_waiting_frees_the_slot_at_its_deadline(triton):
    """A client killed before it can say so: the request carries the client's timeout, past which the
    denoiser drops it."""
    cancelled = metric(triton, "voltacache_cancelled_requests_total", p.DENOISER)
    started = time.monotonic()
    try:
        Client(triton.grpc_url, timeout_s=2).generate(PROMPT, steps=1000, seed=12, scheduler="ddim", cache_mode="off")
    except VoltacacheError as e:
        assert "Deadline" in str(e) or "deadline" in str(e), e
    else:
        raise AssertionError("1000 steps within 2 s")
    _ticks_after(triton, time.monotonic())
    assert time.monotonic() - started < 30
    assert metric(triton, "voltacache_cancelled_requests_total", p.DENOISER) == cancelled + 1


def test_cancel_names_the_request_by_id(triton):
    from concurrent.futures import ThreadPoolExecutor

    client = Client(triton.grpc_url)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.generate, PROMPT, steps=1000, seed=13, scheduler="ddim", cache_mode="off")
        deadline = time.monotonic() + 60
        while not _running(triton):
            assert time.monotonic() < deadline
        assert client.cancel() == 1  # its one request in flight
        try:
            future.result(timeout=30)
        except VoltacacheError as e:
            assert "cancelled by its client after" in str(e), e
        else:
            raise AssertionError("a cancelled request answered with an image")
    assert client.cancel("no-such-request") == 0
