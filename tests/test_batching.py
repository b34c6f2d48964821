"""The step batcher in process, on the session's ONNX Runtime engines: requests at different steps,
with different settings, batched into shared U-Net calls, each equal to the same request run alone."""

from __future__ import annotations

import numpy as np
import pytest

from voltacache.errors import InvalidRequest
from voltacache.pipeline.batching import Cancelled, StepBatcher, Ticket
from voltacache.request import Request

PROMPT = "a photo of an astronaut riding a horse"
INIT = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)  # any size: resized
# Batching changes the rows a kernel sees, not the arithmetic of a row (ONNX Runtime's CPU kernels run
# rows independently): measured equal to the level here; allowed 1 of 255 levels, as for diffusers.
MAX_LEVELS = 1
REQUESTS = [
    Request(PROMPT, steps=8, seed=1, scheduler="ddim"),
    Request(PROMPT, steps=7, seed=2, scheduler="euler-a", cache_interval=3),
    Request("a red square", steps=6, seed=3, scheduler="dpm++2m", guidance=3.0, cache_interval=2),
    Request(PROMPT, steps=9, seed=4, scheduler="pndm", cache_interval=3, cache_schedule="nonuniform"),
    Request("a blue circle", steps=8, seed=5, scheduler="lms", init_image=INIT, strength=0.6),
    Request(PROMPT, negative_prompt="blurry", steps=6, seed=6, scheduler="euler", guidance=1.0),
    # schedules are per request: calibrated (conftest calibrates 12 steps at N = 3) and adaptive beside the rest
    Request(PROMPT, steps=12, seed=7, scheduler="ddim", cache_interval=3, cache_schedule="calibrated"),
    Request("a red square", steps=10, seed=8, scheduler="euler", cache_schedule="adaptive", refresh_threshold=0.05),
    # inpainting (latent blending after each step) beside the rest; the mask any size, RGB
    Request(
        PROMPT, steps=8, seed=9, scheduler="ddim", init_image=INIT, mask_image=INIT, strength=0.75, cache_interval=2
    ),
]


def submit(batcher, sd, request, answers, cancelled=lambda: False):
    ticket = Ticket(*_inputs(sd, request), lambda r, e: answers.__setitem__(id(ticket), (r, e)), cancelled)
    batcher.submit(ticket)
    return ticket


def drain(batcher, limit=500):
    ticks = []
    while batcher.waiting or batcher.active:
        ticks.append(batcher.tick())
        assert len(ticks) < limit
    return ticks


def levels(a, b) -> int:
    return int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max())


def test_batched_requests_equal_each_run_alone(sd):
    batcher = StepBatcher(sd, capacity=len(REQUESTS))
    answers = {}
    tickets = [submit(batcher, sd, r, answers) for r in REQUESTS]
    ticks = drain(batcher)
    for ticket, request in zip(tickets, REQUESTS):
        result, error = answers[id(ticket)]
        assert error is None
        alone = sd(request)
        assert levels(result.images, np.stack([np.asarray(i) for i in alone.images])) <= MAX_LEVELS
        assert (result.stats.unet_deep_calls, result.stats.unet_shallow_calls) == (
            alone.stats.unet_deep_calls,
            alone.stats.unet_shallow_calls,
        )
    # the requests shared U-Net calls: fewer ticks than steps run one by one, every image counted once
    assert len(ticks) < sum(t.stats.unet_deep_calls + t.stats.unet_shallow_calls for t, _ in answers.values())
    assert sum(t.deep_images + t.shallow_images for t in ticks) == sum(
        r.stats.unet_deep_calls + r.stats.unet_shallow_calls for r, _ in answers.values()
    )
    assert max(t.deep_images + t.shallow_images for t in ticks) == len(REQUESTS)


def test_requests_join_and_leave_at_step_boundaries_within_capacity(sd):
    batcher = StepBatcher(sd, capacity=2)
    answers = {}
    tickets = [submit(batcher, sd, Request(PROMPT, steps=s, seed=s, scheduler="ddim"), answers) for s in (3, 5, 4)]
    ticks = drain(batcher)
    assert max(t.active for t in ticks) == 2  # the third waited for a slot
    assert ticks[0].admitted == 2 and sum(t.admitted for t in ticks) == 3
    assert all(answers[id(t)][1] is None for t in tickets)
    third = answers[id(tickets[2])][0]
    assert third.stats.unet_deep_calls == 4


def test_a_bad_request_fails_alone(sd, monkeypatch):
    batcher = StepBatcher(sd, capacity=8)
    answers = {}
    good = submit(batcher, sd, Request(PROMPT, steps=5, seed=1, scheduler="ddim"), answers)
    # a strength that leaves no step fails when it is admitted
    empty = submit(batcher, sd, Request(PROMPT, steps=5, seed=2, init_image=INIT, strength=0.05), answers)
    broken = submit(batcher, sd, Request(PROMPT, steps=5, seed=3, scheduler="ddim"), answers)
    batcher.tick()
    # a request whose rows cannot run fails the shared call; the call is retried request by request
    bad_work = broken.work
    bad_work.embeddings = bad_work.embeddings[:, :5]
    drain(batcher)
    assert isinstance(answers[id(empty)][1], InvalidRequest)
    assert answers[id(broken)][0] is None and answers[id(broken)][1] is not None
    result, error = answers[id(good)]
    assert error is None
    assert (
        levels(result.images, np.asarray(sd(Request(PROMPT, steps=5, seed=1, scheduler="ddim")).images[0])[None]) == 0
    )


def test_a_cancelled_request_frees_its_slot(sd):
    batcher = StepBatcher(sd, capacity=1)
    answers, gone = {}, {"now": False}
    first = submit(batcher, sd, Request(PROMPT, steps=50, seed=1, scheduler="ddim"), answers, lambda: gone["now"])
    second = submit(batcher, sd, Request(PROMPT, steps=3, seed=2, scheduler="ddim"), answers)
    for _ in range(3):
        batcher.tick()
    assert batcher.active[0] is first and first.work.index == 3
    gone["now"] = True
    ticks = drain(batcher)
    assert isinstance(answers[id(first)][1], Cancelled)
    assert answers[id(second)][1] is None
    assert len(ticks) == 3  # the second request ran at once, not after 47 more steps


def test_thread_serves_and_closes(sd):
    import threading

    batcher = StepBatcher(sd).start()
    done = threading.Event()
    answers = {}
    ticket = Ticket(
        *_inputs(sd, Request(PROMPT, steps=4, seed=9, scheduler="ddim")),
        lambda r, e: (answers.update(r=r, e=e), done.set()),
    )
    batcher.submit(ticket)
    assert done.wait(60) and answers["e"] is None
    late = Ticket(
        *_inputs(sd, Request(PROMPT, steps=400, seed=9, scheduler="ddim")), lambda r, e: answers.update(late=e)
    )
    batcher.submit(late)
    batcher.close()
    assert answers["late"] is not None  # answered, not left hanging
    with pytest.raises(Exception, match="shutting down"):
        batcher.submit(late)


def _inputs(sd, request):
    from voltacache.pipeline.stable_diffusion import Stats

    return (request, *sd.encode_prompt(request, Stats()))
