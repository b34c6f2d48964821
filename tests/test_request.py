"""The one request type: its checks, its wire format, and that the client side needs no torch."""

import subprocess
import sys

import numpy as np
import pytest

from voltacache.errors import InvalidRequest
from voltacache.request import MAX_PROMPT_BYTES, Request
from voltacache.serving import protocol as p


def test_defaults_are_written_once_and_check():
    request = Request("a cat").check()
    assert (request.steps, request.guidance, request.scheduler, request.cache_mode) == (50, 7.5, "pndm", "on")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "x" * (MAX_PROMPT_BYTES + 1)}, f"prompt is {MAX_PROMPT_BYTES + 1} bytes"),
        ({"prompt": "caf\udce9"}, "not valid UTF-8"),  # a binary argv byte, as Python decodes it
        ({"prompt": "a\x00b"}, "control characters"),
        ({"prompt": b"bytes"}, "must be text"),
        ({"steps": 0}, "steps 0"),
        ({"steps": 1001}, "steps 1001"),
        ({"steps": True}, "steps True"),
        ({"guidance": 1e30}, "guidance 1e"),
        ({"guidance": -1.0}, "guidance -1"),
        ({"guidance": float("nan")}, "guidance nan"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -1}, "seed -1"),
        ({"scheduler": "heun"}, "scheduler 'heun'"),
        ({"cache_interval": 0}, "cache_interval 0"),
        ({"cache_schedule": "random"}, "cache_schedule 'random'"),
        ({"cache_mode": "always"}, "cache_mode 'always'"),
        ({"height": 3}, "height 3"),
        ({"init_image": np.zeros((8, 8), np.uint8)}, "init_image: must be uint8"),
        ({"init_image": np.zeros((8, 8, 3), np.float32)}, "init_image: must be uint8"),
        ({"init_image": np.zeros((5000, 8, 3), np.uint8)}, "each side at most"),
        ({"init_image": np.zeros((8, 8, 3), np.uint8), "strength": 1.5}, "strength 1.5"),
        ({"init_image": np.zeros((8, 8, 3), np.uint8), "steps": 1, "strength": 0.5}, "no denoising step"),
        ({"original_size": (1024,)}, r"original_size \(1024,\): must be two integers"),
        ({"target_size": (0, 1024)}, "target_size 0: must be an integer from 1 to 16384"),
        ({"crop_top_left": (-1, 0)}, "crop_top_left -1: must be an integer from 0 to 16384"),
        ({"original_size": "1024x1024"}, "original_size '1024x1024': must be two integers"),
    ],
)
def test_bad_fields_are_refused_by_name(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        Request(**{"prompt": "a cat", **fields}).check()


@pytest.mark.parametrize("img2img", [False, True])
def test_triton_round_trip(img2img):
    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8) if img2img else None
    # SDXL's size conditioning travels when given (here with img2img), and is left out when not
    sizes = ((1024, 768), (0, 16), (512, 512)) if img2img else (None, None, None)
    # the adaptive schedule's threshold travels when given, as the sizes do
    interval, schedule, threshold = (1, "adaptive", 0.25) if img2img else (3, "nonuniform", None)
    loras = (("style", 0.5), ("other", -1.25)) if img2img else ()  # LoRAs travel when given, as the sizes do
    request = Request(
        "a cat",
        negative_prompt="blurry",
        steps=12,
        guidance=5.0,
        seed=7,
        scheduler="euler",
        cache_interval=interval,
        cache_schedule=schedule,
        init_image=image,
        strength=0.5,
        cache_mode="refresh",
        original_size=sizes[0],
        crop_top_left=sizes[1],
        target_size=sizes[2],
        refresh_threshold=threshold,
        loras=loras,
        height=512 if img2img else None,  # a size travels when given
        width=768 if img2img else None,
    ).check()
    tensors = request.to_triton()
    # left out: txt2img's image tensors and unset ones (None or no LoRAs); here no inpainting mask
    everything = {t.tensor.name for t in p.REQUEST_TENSORS}
    unset = {p.ORIGINAL_SIZE, p.CROP_TOP_LEFT, p.TARGET_SIZE, p.REFRESH_THRESHOLD, p.LORAS, p.HEIGHT, p.WIDTH}
    # ControlNet's tensors travel only with ControlNets (tests/test_controlnet.py)
    control = {p.CONTROLNETS, p.CONTROL_IMAGE, p.CONTROL_START, p.CONTROL_END, p.CONTROL_RESIDUALS}
    assert set(tensors) == everything - control - ({p.MASK_IMAGE} if img2img else p.IMAGE_INPUTS | unset)
    assert tensors[p.PROMPT].dtype == object and tensors[p.STEPS].dtype == np.int32
    back = Request.from_triton(tensors.get)
    sent = request if img2img else request.replace(strength=Request.strength)  # txt2img sends no strength
    assert back == sent  # every field but the pixels
    assert (back.init_image is None) == (not img2img)
    if img2img:
        assert np.array_equal(back.init_image, image)
    assert p.ensemble(request) == (p.IMG2IMG if img2img else p.TXT2IMG)


def test_random_seed_travels_as_minus_one():
    tensors = Request("a cat").to_triton()
    assert tensors[p.SEED][0] == p.RANDOM_SEED
    assert Request.from_triton(tensors.get).seed is None


def test_from_triton_names_what_is_wrong():
    tensors = Request("a cat").to_triton()
    assert Request.from_triton({k: v for k, v in tensors.items() if k != p.STEPS}.get).steps == Request.steps
    with pytest.raises(InvalidRequest, match="missing input PROMPT"):
        Request.from_triton({k: v for k, v in tensors.items() if k != p.PROMPT}.get)
    tensors[p.PROMPT] = np.array([b"\xff\xfe"], dtype=object)
    with pytest.raises(InvalidRequest, match="PROMPT is not valid UTF-8"):
        Request.from_triton(tensors.get)


@pytest.mark.slow
def test_client_and_light_models_import_without_torch():
    code = (
        "import sys\n"
        "import voltacache.request, voltacache.serving.client, voltacache.serving.python_models\n"
        "import voltacache.runtime.tokenizer, voltacache.images, voltacache.generate\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, "
        "[m for m in ('torch', 'diffusers') if m in sys.modules]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"cache_schedule": "adaptive", "cache_interval": 3}, "cache_interval 3: the adaptive schedule"),
        ({"refresh_threshold": 0.2}, "refresh_threshold: only with cache_schedule adaptive"),
        ({"cache_schedule": "adaptive", "refresh_threshold": -0.1}, "refresh_threshold -0.1"),
        ({"cache_schedule": "adaptive", "refresh_threshold": float("nan")}, "refresh_threshold nan"),
        ({"cache_schedule": "often"}, "cache_schedule 'often'"),
    ],
)
def test_deepcache_schedule_fields_checked(fields, words):
    with pytest.raises(InvalidRequest, match=words):
        Request("a cat", **fields).check()


def test_adaptive_threshold_defaults():
    from voltacache.request import DEFAULT_REFRESH_THRESHOLD

    assert Request("a cat", cache_schedule="adaptive").check().threshold == DEFAULT_REFRESH_THRESHOLD


def test_what_scopes_a_cache_entry_is_declared_and_a_new_field_is_scoped_by_default():
    """The cache scope and the description read the fields' declarations: a field added to Request without
    one changes the scope (a new field's image is never served for the old field's value)."""
    import dataclasses

    plain = Request("a cat")
    assert set(plain.scoped_fields()) == {f.name for f in dataclasses.fields(Request)} - {
        "prompt",  # the cache's key: its embedding
        "seed",  # the cache picks a seed of its own entries
        "cache_mode",
        "refresh_threshold",  # only with the adaptive schedule
        "strength",  # only with an init image
        "control_start",  # only with ControlNets
        "control_end",
        "control_residuals",
    }
    assert "strength" in Request("a cat", init_image=np.zeros((8, 8, 3), np.uint8)).scoped_fields()
    eta = dataclasses.field(default=0.0, kw_only=True)
    Extended = dataclasses.make_dataclass("Extended", [("eta", float, eta)], bases=(Request,), frozen=True)
    assert Extended("a cat", eta=0.5).scoped_fields()["eta"] == ("value", 0.5)
    assert Extended("a cat", eta=0.5).description()["eta"] == 0.5


@pytest.mark.parametrize("field, value", [("strength", 0.7), ("guidance", 7.3), ("control_end", 0.7)])
def test_float32_fields_come_back_as_written(field, value):
    """A float32 on the wire is read as the decimal the client wrote: strength 0.7 as 0.699999988 ran one img2img
    step of 10 fewer served than in process (int(10 x 0.699999988) = 6)."""
    fields = {"init_image": np.zeros((8, 8, 3), np.uint8)} if field == "strength" else {}
    if field == "control_end":
        fields |= {"controlnets": {"canny": 1.0}, "control_images": np.zeros((8, 8, 3), np.uint8)}
    request = Request.of("a cat", **fields, **{field: value})
    assert getattr(Request.from_triton(request.to_triton().get), field) == value
