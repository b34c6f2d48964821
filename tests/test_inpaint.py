"""Inpainting (issue 21): the mask as diffusers' mask processor makes it, the request's checks, and parity
with diffusers' StableDiffusionInpaintPipeline for an ordinary checkpoint (latent blending) and for SD 1.5
inpainting's 9-channel U-Net (the inpaint-tiny preset)."""

import numpy as np
import pytest
import torch
from helpers import INIT, MASK, PROMPT, cli, diffusers_inpaint, levels, one_error_line
from PIL import Image

from voltacache.cache.embedders import ClipPooledEmbedder
from voltacache.cache.layers import RequestCache
from voltacache.cache.store import CacheStore
from voltacache.errors import InvalidRequest
from voltacache.images import fit_mask
from voltacache.request import Request
from voltacache.serving import protocol as p

MAX_LEVELS, MAX_FRACTION = 1, 0.005  # as tests/test_pipeline.py: fp32 ONNX Runtime against PyTorch


@pytest.mark.parametrize("form", ["gray", "gray1", "rgb", "rgb-other-size"])
def test_mask_is_what_diffusers_mask_processor_makes(form):
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(1)
    size = (40, 56) if form == "rgb-other-size" else (64, 64)
    mask = rng.integers(0, 256, (*size, 3) if form.startswith("rgb") else size, dtype=np.uint8)
    theirs = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    expected = theirs.preprocess(Image.fromarray(mask), height=64, width=64).numpy()
    ours = fit_mask(mask[..., None] if form == "gray1" else mask, 64, 64)
    assert ours.shape == (1, 1, 64, 64) and np.array_equal(ours, expected)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"mask_image": MASK}, "mask_image: inpainting repaints an init_image"),
        ({"init_image": INIT, "mask_image": MASK.astype(np.float32)}, "mask_image: must be uint8"),
        ({"init_image": INIT, "mask_image": np.zeros((64, 64, 2), np.uint8)}, r"mask_image: .*\(64, 64, 2\)"),
        ({"init_image": INIT, "mask_image": np.zeros((1, 64, 64, 1), np.uint8)}, "mask_image: must be uint8"),
        ({"init_image": INIT, "mask_image": np.zeros((64, 0), np.uint8)}, "mask_image is 0x64"),
        ({"init_image": INIT, "mask_image": "/nonexistent.png"}, "mask_image /nonexistent.png: no such file"),
    ],
)
def test_bad_mask_is_one_line_naming_mask_image(fields, message):
    with pytest.raises(InvalidRequest, match=message) as caught:
        Request.of(PROMPT, **fields).check()
    assert "\n" not in str(caught.value)


def test_mask_travels_in_the_inpaint_ensemble(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray(MASK).save(path)
    request = Request.of(PROMPT, init_image=INIT, mask_image=path, strength=0.5).check()
    assert request.inpaint and p.ensemble(request) == p.INPAINT and np.array_equal(request.mask_image, MASK)
    tensors = request.to_triton()
    assert tensors[p.MASK_IMAGE].shape == (64, 64, 1)  # a grayscale mask travels as one plane
    back = Request.from_triton(tensors.get)
    assert back.inpaint and np.array_equal(back.mask_image[..., 0], MASK) and back == request
    assert p.MASK_IMAGE not in request.replace(mask_image=None).to_triton()
    assert request.description() | {"prompt": ""} == {  # what a person browsing the cache is told
        **Request("").description(),
        "img2img": True,
        "strength": 0.5,
        "inpaint": True,
    }


@pytest.mark.parametrize("scheduler, strength", [("ddim", 0.6), ("pndm", 1.0), ("euler-a", 0.8)])
def test_latent_blending_equals_diffusers(sd, tiny_pipe, scheduler, strength):
    """An ordinary (4-channel) checkpoint: each step puts the init image back where the mask keeps it."""
    ours = sd(PROMPT, steps=10, seed=5, scheduler=scheduler, init_image=INIT, mask_image=MASK, strength=strength)
    worst, fraction = levels(ours.images[0], diffusers_inpaint(tiny_pipe, scheduler, 5, 10, strength))
    assert worst <= MAX_LEVELS and fraction <= MAX_FRACTION
    assert ours.stats.steps == int(10 * strength)


def test_latent_blending_keeps_the_image_latents_outside_the_mask(sd):
    """After the last step the latents outside the mask are the init image's, whatever the prompt; inside, not."""
    from voltacache.images import fit_image, to_unit_range
    from voltacache.pipeline.stable_diffusion import Stats

    image = to_unit_range(fit_image(INIT, 64, 64))
    latents = []
    for prompt in (PROMPT, "a bowl of fruit"):
        request = Request(prompt, steps=6, seed=1, scheduler="ddim", init_image=INIT, mask_image=MASK, strength=0.7)
        embeddings, pooled = sd.encode_prompt(request, Stats())
        latents.append(sd.generate_latents(embeddings, request, image, pooled=pooled)[0].numpy())
    keep = np.broadcast_to(sd.mask(request)[:, :, ::8, ::8] == 0, latents[0].shape)
    assert np.array_equal(latents[0][keep], latents[1][keep])
    assert np.abs(latents[0] - latents[1])[~keep].mean() > 1e-3


@pytest.fixture(scope="module")
def inpaint_tiny(tmp_path_factory):
    """The inpaint-tiny preset (SD 1.5 inpainting's 9-channel U-Net), exported in fp32 and built."""
    from conftest import tiny_family

    return tiny_family(tmp_path_factory, "inpaint-tiny")


@pytest.fixture(scope="module")
def inpaint_sd(inpaint_tiny):
    from voltacache.pipeline.stable_diffusion import StableDiffusion

    return StableDiffusion.from_engines(inpaint_tiny[1])


@pytest.mark.slow
def test_nine_channel_unet_is_exported_and_equals_diffusers(inpaint_tiny, inpaint_sd):
    from voltacache.compile.checkpoint import load_pipeline

    model, _ = inpaint_tiny
    pipe = load_pipeline(model)
    assert pipe.unet.config.in_channels == 9
    specs = {name: r.spec.inputs[0].shape for name, r in inpaint_sd.runners.items() if name.startswith("unet")}
    assert all(shape[1:] == (9, 8, 8) for shape in specs.values()), specs
    for scheduler, strength in (("ddim", 1.0), ("euler-a", 0.7)):  # 1.0: from pure noise, no init-image draw
        ours = inpaint_sd(
            PROMPT, steps=8, seed=3, scheduler=scheduler, init_image=INIT, mask_image=MASK, strength=strength
        )
        worst, fraction = levels(ours.images[0], diffusers_inpaint(pipe, scheduler, 3, 8, strength))
        assert worst <= MAX_LEVELS and fraction <= MAX_FRACTION, (scheduler, worst, fraction)


@pytest.mark.slow
def test_nine_channel_unet_runs_deepcache_and_refuses_txt2img(inpaint_sd):
    request = dict(steps=9, seed=3, scheduler="ddim", init_image=INIT, mask_image=MASK, strength=1.0)
    full = inpaint_sd(PROMPT, **request)
    cached = inpaint_sd(PROMPT, cache_interval=3, **request)  # the shallow U-Net reads the 9-channel sample too
    assert (cached.stats.unet_deep_calls, cached.stats.unet_shallow_calls) == (3, 6)
    assert np.abs(np.asarray(full.images[0], int) - np.asarray(cached.images[0], int)).mean() < 10
    with pytest.raises(InvalidRequest, match="mask_image: this is an inpainting model"):
        inpaint_sd(PROMPT, steps=4)


@pytest.mark.slow
def test_nine_channel_deployment_declares_the_nine_channel_sample(inpaint_tiny, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from voltacache.serving.deploy import deploy

    repo = deploy(inpaint_tiny[1], tmp_path / "repo")
    for unet in ("unet_deep", "unet_shallow"):
        config = text_format.Parse((repo / unet / "config.pbtxt").read_text(), mc.ModelConfig())
        dims = {i.name: list(i.dims) for i in config.input}
        assert dims["sample"] == [-1, 9, 8, 8], dims
    inpaint = text_format.Parse((repo / p.INPAINT / "config.pbtxt").read_text(), mc.ModelConfig())
    assert {i.name for i in inpaint.input if not i.optional} == {p.PROMPT}
    assert {p.INIT_IMAGE, p.MASK_IMAGE, p.STRENGTH} <= {i.name for i in inpaint.input}


def test_cache_is_scoped_by_mask(sd, tmp_path):
    store = CacheStore(str(tmp_path / "index.db"), tmp_path / "blobs", dim=64, embedder="clip")
    cache = RequestCache(store, ClipPooledEmbedder(64), "tiny-inpaint")
    request = dict(steps=6, seed=2, scheduler="ddim", init_image=INIT, mask_image=MASK, strength=0.5, cache=cache)
    first, repeat = sd(PROMPT, **request), sd(PROMPT, **request)
    assert (first.cache, repeat.cache) == ("miss", "semantic")
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(repeat.images[0]))
    assert sd(PROMPT, **{**request, "mask_image": 255 - MASK}).cache == "miss"  # another mask
    assert sd(PROMPT, **{**request, "mask_image": None}).cache == "miss"  # img2img of the same image
    assert sd(PROMPT, **{**request, "mask_image": np.stack([MASK] * 3, axis=2)}).cache == "semantic"  # the same mask


def test_strength_defaults_to_diffusers_own_for_each_kind():
    assert Request(PROMPT, init_image=INIT).strength == 0.8  # StableDiffusionImg2ImgPipeline's default
    assert Request(PROMPT, init_image=INIT, mask_image=MASK).strength == 1.0  # StableDiffusionInpaintPipeline's
    assert Request(PROMPT, init_image=INIT, mask_image=MASK, strength=0.5).strength == 0.5
    back = Request.from_triton(Request(PROMPT, init_image=INIT, mask_image=MASK).to_triton().get)
    assert back.strength == 1.0  # served, the same


def test_cli_inpaints_and_refuses_a_mask_without_image(engines_dir, sd, tmp_path):
    Image.fromarray(INIT).save(tmp_path / "init.png")
    Image.fromarray(MASK).save(tmp_path / "mask.png")
    (tmp_path / "bad.png").write_text("not an image")
    common = ["generate", PROMPT, "--engines", engines_dir, "--steps", 4, "--seed", 1, "--scheduler", "ddim"]
    result = cli(
        *common, "--init-image", tmp_path / "init.png", "--mask-image", tmp_path / "mask.png", "-o", tmp_path / "a.png"
    )
    assert result.exit_code == 0, result.output
    expected = sd(PROMPT, steps=4, seed=1, scheduler="ddim", init_image=INIT, mask_image=MASK, strength=1.0)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(expected.images[0]))  # diffusers' 1
    one_error_line(
        cli(*common, "--mask-image", tmp_path / "mask.png", "-o", tmp_path / "b.png"), 2, "--mask-image", "--init-image"
    )
    bad = cli(
        *common, "--init-image", tmp_path / "init.png", "--mask-image", tmp_path / "bad.png", "-o", tmp_path / "c.png"
    )
    one_error_line(bad, 2, "--mask-image", "not a readable image")


def test_inpainting_single_file_loads_with_its_nine_channels(tiny_dir, tmp_path):
    """A single file's U-Net reads what its header says, whatever the config folder it is read against says."""
    from voltacache.compile.checkpoint import load_pipeline
    from voltacache.compile.presets import random_pipeline
    from voltacache.compile.single_file import save_single_file

    pipe = random_pipeline("inpaint-tiny", seed=0)
    save_single_file(pipe, tmp_path / "inpaint.safetensors")
    loaded = load_pipeline(tmp_path / "inpaint.safetensors", config=tiny_dir)  # tiny's: a 4-channel U-Net
    assert loaded.unet.config.in_channels == 9
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert load_pipeline(tiny_dir).unet.config.in_channels == 4  # the config folder itself is untouched


def test_nine_channel_sample_is_written_once_in_the_geometry(tiny_pipe):
    """The U-Net's sample reads sample_channels, its noise prediction and the VAE the latent channels; a
    manifest written before inpainting (no sample_channels) reads as before."""
    from voltacache.compile.unet_split import shallow_layer_count
    from voltacache.specs import NOISE_PRED, SAMPLE, UNET_DEEP, UNET_SHALLOW, Geometry, component_specs

    geometry = Geometry.from_pipeline(tiny_pipe, shallow_layer_count(tiny_pipe.unet, "block"))
    old = {k: v for k, v in geometry.__dict__.items() if k != "sample_channels"}
    assert Geometry(**old).unet_channels == 4 and not Geometry(**old).inpainting
    nine = Geometry(**old, sample_channels=9)
    assert nine.inpainting
    for name, spec in component_specs(nine, 1, 64, 64).items():
        tensors = {t.name: t.shape for t in spec.inputs + spec.outputs}
        if name in (UNET_DEEP, UNET_SHALLOW):
            assert tensors[SAMPLE] == (2, 9, 8, 8) and tensors[NOISE_PRED] == (2, 4, 8, 8)
