import math

import numpy as np
import pytest
import torch
from helpers import PROMPT, diffusers_image, levels
from PIL import Image

from voltacache.pipeline.stable_diffusion import InvalidRequest, StableDiffusion
from voltacache.schedulers import make_scheduler

# Tolerance against diffusers, fp32 ONNX Runtime vs PyTorch: every channel within 1 of 255 levels,
# and at most 0.5% of values off by that one level (measured: 0 to 0.03%).
MAX_LEVELS, MAX_FRACTION = 1, 0.005


def psnr(a, b):
    mse = ((np.asarray(a, float) - np.asarray(b, float)) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "euler-a", "dpm++2m", "lms"])
def test_equals_diffusers_without_caching(sd, tiny_pipe, scheduler):
    ours = sd(PROMPT, steps=20, guidance=7.5, seed=42, scheduler=scheduler).images[0]
    worst, fraction = levels(ours, diffusers_image(tiny_pipe, scheduler, 42))
    assert worst <= MAX_LEVELS and fraction <= MAX_FRACTION


def test_negative_prompt_and_low_guidance_match_diffusers(sd, tiny_pipe):
    ours = sd(PROMPT, negative_prompt="blurry", steps=10, guidance=3.0, seed=7, scheduler="ddim").images[0]
    assert levels(ours, diffusers_image(tiny_pipe, "ddim", 7, 10, 3.0, "blurry"))[0] <= MAX_LEVELS
    ours = sd(PROMPT, steps=10, guidance=1.0, seed=7, scheduler="ddim").images[0]
    assert levels(ours, diffusers_image(tiny_pipe, "ddim", 7, 10, 1.0))[0] <= MAX_LEVELS


@pytest.mark.parametrize("interval", [2, 3, 5])
def test_deepcache_interval(sd, interval):
    full = sd(PROMPT, steps=20, seed=3, scheduler="ddim")
    cached = sd(PROMPT, steps=20, seed=3, scheduler="ddim", cache_interval=interval)
    assert cached.stats.unet_deep_calls == math.ceil(20 / interval)
    assert cached.stats.unet_shallow_calls == 20 - math.ceil(20 / interval)
    # measured on the tiny random model: 48.6 / 46.4 / 42.7 dB at N = 2 / 3 / 5
    quality = psnr(full.images[0], cached.images[0])
    assert 35 < quality < math.inf


def test_nonuniform_schedule_runs(sd):
    result = sd(PROMPT, steps=20, seed=3, scheduler="ddim", cache_interval=3, cache_schedule="nonuniform")
    assert result.stats.unet_deep_calls == 7


def test_same_seed_same_image_other_seed_other_image(sd):
    a = sd(PROMPT, steps=5, seed=1, scheduler="ddim").images[0]
    b = sd(PROMPT, steps=5, seed=1, scheduler="ddim").images[0]
    c = sd(PROMPT, steps=5, seed=2, scheduler="ddim").images[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_img2img_equals_diffusers(sd, tiny_pipe, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / "init.png"
    init.save(path)
    ours = sd(PROMPT, steps=10, seed=5, scheduler="ddim", init_image=path, strength=0.6)
    scheduler = make_scheduler("ddim", dict(tiny_pipe.scheduler.config))
    img2img = StableDiffusionImg2ImgPipeline(**{**tiny_pipe.components, "scheduler": scheduler})
    theirs = img2img(
        PROMPT, image=init, strength=0.6, num_inference_steps=10, generator=torch.Generator("cpu").manual_seed(5)
    ).images[0]
    assert ours.stats.steps == 6
    assert levels(ours.images[0], theirs)[0] <= MAX_LEVELS


class CountingRunner:
    def __init__(self, runner):
        self.runner, self.spec, self.calls = runner, runner.spec, 0

    def infer(self, feeds):
        self.calls += 1
        return self.runner.infer(feeds)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps 0"),
        ({"steps": 1001}, "steps 1001"),
        ({"guidance": float("nan")}, "guidance nan"),
        ({"guidance": float("inf")}, "guidance inf"),
        ({"scheduler": "heun"}, "scheduler 'heun'"),
        ({"height": 128}, "static at 64x64"),
        ({"cache_interval": 0}, "cache_interval 0"),
        ({"init_image": "/nonexistent.png"}, "init_image /nonexistent.png: no such file"),
        ({"init_image": np.zeros((64, 64, 3), np.uint8), "strength": 0.0}, "strength 0.0"),
        ({"init_image": np.zeros((64, 64, 3), np.uint8), "steps": 2, "strength": 0.4}, "no denoising step"),
        ({"guidance": 1e30}, "guidance 1e"),
        ({"seed": 2**63}, "seed 9223372036854775808"),
        ({"seed": -5}, "seed -5"),
        ({"negative_prompt": "x" * 5000}, "negative_prompt is 5000 bytes"),
        ({"cache_mode": "sometimes"}, "cache_mode 'sometimes'"),
    ],
)
def test_bad_input_rejected_before_compute(sd, kwargs, message):
    counting = {name: CountingRunner(r) for name, r in sd.runners.items()}
    guarded = StableDiffusion(counting, sd.export, sd.tokenizers)
    with pytest.raises(InvalidRequest, match=message):
        guarded(PROMPT, **kwargs)
    assert sum(r.calls for r in counting.values()) == 0


def test_init_image_of_another_size_is_resized(sd):
    """Any size is resized to the engines' (served alike: the denoiser runs the same code)."""
    small = np.random.default_rng(3).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    result = sd(PROMPT, steps=4, seed=2, scheduler="ddim", init_image=small, strength=0.5)
    assert result.images[0].size == (64, 64) and result.stats.steps == 2


def test_pndm_reports_denoising_steps_not_unet_calls(sd):
    result = sd(PROMPT, steps=20, seed=1, scheduler="pndm")
    assert result.stats.steps == 20
    assert result.stats.unet_deep_calls == 21  # PNDM's PLMS warm-up evaluates one timestep twice


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "euler-a", "dpm++2m", "lms"])
def test_the_documented_maximum_of_steps_schedules_for_every_scheduler(tiny_pipe, scheduler):
    sched = make_scheduler(scheduler, dict(tiny_pipe.scheduler.config), steps=1000)
    sched.set_timesteps(1000)
    assert int(sched.timesteps.max()) <= 999
    latents = torch.zeros(1, 4, 8, 8)
    for t in sched.timesteps[:3]:
        latents = sched.step(torch.zeros_like(latents), t, latents, return_dict=False)[0]


@pytest.mark.slow
def test_a_thousand_steps_generate(sd):
    assert sd(PROMPT, steps=1000, seed=0, scheduler="ddim", guidance=1.0).stats.steps == 1000


def test_other_step_counts_keep_diffusers_schedule(tiny_pipe):
    for steps in (20, 50, 999):
        ours = make_scheduler("ddim", dict(tiny_pipe.scheduler.config), steps=steps)
        theirs = make_scheduler("ddim", dict(tiny_pipe.scheduler.config))
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        assert torch.equal(ours.timesteps, theirs.timesteps)


def test_cli_generate_json(engines_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from voltacache.cli import app

    out = tmp_path / "img.png"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--engines",
            str(engines_dir),
            "a cat",
            "-o",
            str(out),
            "--steps",
            "6",
            "--cache-interval",
            "3",
            "--seed",
            "9",
            "--scheduler",
            "ddim",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["path"] == str(out) and Image.open(out).size == (64, 64)
    assert (record["seed"], record["steps"], record["cache_interval"]) == (9, 6, 3)
    assert (record["unet_deep_calls"], record["unet_shallow_calls"]) == (2, 4)
    assert record["seconds"] > 0
