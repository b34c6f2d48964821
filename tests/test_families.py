"""SDXL and SD 2.x through our engines: the same images as diffusers' own pipelines, SDXL's size
conditioning, and caches that never mix families."""

import math

import numpy as np
import pytest
from helpers import PROMPT, diffusers_image, levels
from PIL import Image

from voltacache.compile.checkpoint import load_pipeline
from voltacache.errors import InvalidRequest
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.schedulers import SCHEDULERS

MAX_LEVELS, MAX_FRACTION = 1, 0.005  # as for SD 1.5 (tests/test_pipeline.py)
FAMILIES = ["sdxl_tiny", "sd2_tiny"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(our pipeline over the engines, diffusers' pipeline of the same checkpoint)."""
    model, engines = request.getfixturevalue(request.param)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return StableDiffusion.from_engines(engines), pipe


def close(ours, reference) -> bool:
    worst, fraction = levels(ours, reference)
    return worst <= MAX_LEVELS and fraction <= MAX_FRACTION


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_equals_diffusers_without_caching(family, scheduler):
    sd, pipe = family
    ours = sd(PROMPT, steps=8, seed=42, scheduler=scheduler).images[0]
    assert close(ours, diffusers_image(pipe, scheduler, 42, steps=8))


def test_negative_prompt_and_guidance_one_equal_diffusers(family):
    sd, pipe = family
    ours = sd(PROMPT, steps=10, seed=7, scheduler="ddim", guidance=3.0, negative_prompt="blurry").images[0]
    assert close(ours, diffusers_image(pipe, "ddim", 7, 10, 3.0, "blurry"))
    ours = sd(PROMPT, steps=10, seed=7, scheduler="ddim", guidance=1.0).images[0]
    assert close(ours, diffusers_image(pipe, "ddim", 7, 10, 1.0))


def test_img2img_equals_diffusers(family):
    import diffusers

    sd, pipe = family
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ours = sd(PROMPT, steps=10, seed=5, scheduler="ddim", init_image=np.asarray(init), strength=0.6)
    xl = "XL" in type(pipe).__name__
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if xl else diffusers.StableDiffusionImg2ImgPipeline
    reference = diffusers_image(pipe, "ddim", 5, 10, pipeline_class=cls, image=init, strength=0.6)
    assert ours.stats.steps == 6
    assert close(ours.images[0], reference)


@pytest.mark.parametrize("interval", [2, 3])
def test_deepcache_runs_the_full_unet_ceil_steps_over_n_times(family, interval):
    sd, _ = family
    result = sd(PROMPT, steps=10, seed=1, scheduler="ddim", cache_interval=interval)
    assert result.stats.unet_deep_calls == math.ceil(10 / interval)
    assert result.stats.unet_shallow_calls == 10 - math.ceil(10 / interval)


def test_families_are_recorded(sdxl_tiny, sd2_tiny):
    xl, sd2 = (StableDiffusion.from_engines(engines).export for _, engines in (sdxl_tiny, sd2_tiny))
    assert (xl.family, xl.zero_empty_negative, xl.geometry.text_encoders) == ("SDXL", True, 2)
    assert (sd2.family, sd2.zero_empty_negative, sd2.geometry.text_encoders) == ("SD 2.x", False, 1)
    assert sd2.scheduler_config["prediction_type"] == "v_prediction"


def test_size_conditioning_is_passed_through(sdxl_tiny):
    model, engines = sdxl_tiny
    sd, pipe = StableDiffusion.from_engines(engines), load_pipeline(model)
    sizes = dict(original_size=(32, 48), crop_top_left=(8, 4), target_size=(64, 32))
    default = sd(PROMPT, steps=8, seed=3, scheduler="ddim").images[0]
    conditioned = sd(PROMPT, steps=8, seed=3, scheduler="ddim", **sizes).images[0]
    explicit = sd(PROMPT, steps=8, seed=3, scheduler="ddim", original_size=(64, 64), target_size=(64, 64)).images[0]
    assert levels(conditioned, default)[0] > 1  # the conditioning reaches the U-Net
    assert np.array_equal(np.asarray(explicit), np.asarray(default))  # the default is the engines' size, no crop
    reference = diffusers_image(
        pipe,
        "ddim",
        3,
        8,
        crops_coords_top_left=sizes["crop_top_left"],
        **{k: v for k, v in sizes.items() if k != "crop_top_left"},
    )
    assert close(conditioned, reference)


def test_size_conditioning_refused_where_the_model_has_none(sd):
    with pytest.raises(InvalidRequest, match="original_size: size conditioning is SDXL's; this is an SD 1.x model"):
        sd(PROMPT, steps=2, original_size=(64, 64))
    with pytest.raises(InvalidRequest, match=r"crop_top_left \(1,\): must be two integers"):
        sd(PROMPT, steps=2, crop_top_left=(1,))


def test_a_cache_entry_of_one_family_is_never_served_to_another(sd, sdxl_tiny, tmp_path):
    from voltacache.cache.layers import CacheSettings, open_cache

    xl = StableDiffusion.from_engines(sdxl_tiny[1])
    settings = CacheSettings(str(tmp_path / "cache.db"))
    request = dict(steps=4, seed=9, scheduler="ddim")
    first = open_cache(settings, xl.export.fingerprint, xl.export.geometry.pooled_dim)
    assert xl(PROMPT, cache=first, **request).cache == "miss"
    assert xl(PROMPT, cache=first, **request).cache == "semantic"  # the entry is there
    # other size conditioning of the same model: another scope
    assert xl(PROMPT, cache=first, original_size=(32, 32), **request).cache == "miss"
    first.store.close()
    # SD 1.5's tiny model, same prompt, same index: its own scope
    other = open_cache(settings, sd.export.fingerprint, sd.export.geometry.pooled_dim)
    assert sd(PROMPT, cache=other, **request).cache == "miss"
    other.store.close()


def test_int8_export_of_sdxl_is_refused_before_any_work(sdxl_tiny, tmp_path):
    from voltacache.compile.export import export_model
    from voltacache.compile.options import ExportOptions
    from voltacache.errors import ExportError

    with pytest.raises(ExportError, match="--precision int8: calibrated for SD 1.x/2.x U-Nets only so far"):
        export_model(sdxl_tiny[0], tmp_path / "onnx", ExportOptions(precision="int8"))
    assert not (tmp_path / "onnx").exists()


def test_cli_generates_sdxl_with_size_conditioning(sdxl_tiny, tmp_path):
    import json

    from helpers import cli, one_error_line

    engines, out = sdxl_tiny[1], tmp_path / "xl.png"
    args = ["generate", "--engines", engines, PROMPT, "--steps", "4", "--seed", "2", "--scheduler", "ddim"]
    result = cli(*args, "--original-size", "32,48", "--crop-top-left", "8,4", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["path"] == str(out)
    sd = StableDiffusion.from_engines(engines)
    expected = sd(PROMPT, steps=4, seed=2, scheduler="ddim", original_size=(32, 48), crop_top_left=(8, 4))
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected.images[0]))
    one_error_line(cli(*args, "--original-size", "32", "-o", tmp_path / "b.png"), 2, "--original-size '32'")


def test_fp16_export_keeps_sdxls_vae_in_fp32(sdxl_tiny, tiny_pipe):
    """SDXL's VAE overflows in fp16 (its config says force_upcast): in an fp16 export it stays fp32, as
    diffusers upcasts it; the rest is fp16 and checked by the overflow probe. (The full SDXL's fp16 export
    at 512 wrote its VAE graphs in fp32: docs/benchmarks.md.)"""
    from voltacache.compile.export import component_precision

    xl = load_pipeline(sdxl_tiny[0])
    for pipe, vae in ((xl, "fp32"), (tiny_pipe, "fp16")):
        chosen = {name: component_precision(pipe, name, "fp16") for name in ("unet_deep", "vae_decoder", "vae_encoder")}
        assert chosen == {"unet_deep": "fp16", "vae_decoder": vae, "vae_encoder": vae}
    assert component_precision(xl, "vae_decoder", "fp32") == "fp32"
