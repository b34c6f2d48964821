"""Inpainting through the real tritonserver (the session's, on the tiny engines): the inpaint ensemble
answers what the pipeline computes in process, and a malformed mask is refused while the server serves on."""

import time

import numpy as np
import pytest
from PIL import Image

from voltacache.errors import VoltacacheError
from voltacache.request import Request
from voltacache.serving import protocol as p
from voltacache.serving.client import Client

PROMPT = "a photo of an astronaut riding a horse"
INIT = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
MASK = np.zeros((48, 48, 3), np.uint8)  # RGB, another size: resized and made gray by the denoiser
MASK[8:40, 16:44] = 255


def test_inpaint_served_equals_in_process(triton, sd):
    request = dict(steps=8, seed=6, scheduler="ddim", strength=0.75, cache_interval=2)
    served = Client(triton.grpc_url).generate(PROMPT, init_image=INIT, mask_image=MASK, **request)
    local = sd(PROMPT, init_image=Image.fromarray(INIT), mask_image=Image.fromarray(MASK), **request)
    assert np.array_equal(served.images[0], np.asarray(local.images[0]))
    assert (served.steps_computed, served.unet_deep_calls, served.unet_shallow_calls) == (6, 3, 3)


def inpaint_tensors(**changes):
    tensors = Request(PROMPT, steps=3, seed=1, scheduler="ddim", init_image=INIT, mask_image=MASK).to_triton()
    tensors.update(changes)
    return {name: value for name, value in tensors.items() if value is not None}


BAD_MASKS = {
    "wrong rank": (inpaint_tensors(**{p.MASK_IMAGE: np.zeros((1, 64, 64, 1), np.uint8)}), "MASK_IMAGE"),
    "two planes": (inpaint_tensors(**{p.MASK_IMAGE: np.zeros((64, 64, 2), np.uint8)}), "mask_image"),
    "empty": (inpaint_tensors(**{p.MASK_IMAGE: np.zeros((0, 64, 1), np.uint8)}), "mask_image"),
    "mask without image": (inpaint_tensors(**{p.INIT_IMAGE: None}), "give one"),
}


@pytest.mark.parametrize("case", BAD_MASKS)
def test_malformed_mask_gets_an_error_and_the_server_keeps_serving(triton, case):
    tensors, words = BAD_MASKS[case]
    client = Client(triton.grpc_url, timeout_s=30)
    with pytest.raises(VoltacacheError, match=words) as caught:
        client.infer(p.INPAINT, tensors, [p.IMAGES])
    assert "\n" not in str(caught.value)
    seed = np.array([int(time.time_ns() % 10**9)], np.int64)
    out = client.infer(p.INPAINT, inpaint_tensors(**{p.SEED: seed}), [p.IMAGES])
    assert out[p.IMAGES].shape == (1, 64, 64, 3)
