"""Calibrated DeepCache schedules on the session's engines (calibrated for 12 steps at N = 3 in conftest):
a request spends exactly its budget on the calibrated steps, and a calibration is refused for other
engines, step counts and intervals with one line."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from voltacache.errors import InvalidRequest
from voltacache.pipeline.calibration import SCHEDULES_FILE
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.request import Request
from voltacache.specs import DEEP_FEATURE, UNET_DEEP, UNET_SHALLOW

PROMPT = "a photo of an astronaut riding a horse"


class StepRecorder:
    """A runner that records, per call, the timestep it ran (the U-Net's calls, in order)."""

    def __init__(self, runner, log, name):
        self.runner, self.log, self.name = runner, log, name

    def infer(self, feeds):
        self.log.append((self.name, DEEP_FEATURE in feeds))
        return self.runner.infer(feeds)


def deep_steps(sd: StableDiffusion, **request) -> list[int]:
    """The step indices that ran unet_deep."""
    log = []
    runners = {**sd.runners, **{n: StepRecorder(sd.runners[n], log, n) for n in (UNET_DEEP, UNET_SHALLOW)}}
    StableDiffusion(runners, sd.export, sd.tokenizers, sd.calibration)(PROMPT, **request)
    return [k for k, (name, _) in enumerate(log) if name == UNET_DEEP]


def schedule(engines, steps=12, interval=3) -> list[int]:
    return json.loads((engines / SCHEDULES_FILE).read_text())["steps"][str(steps)]["schedules"][str(interval)]


def test_calibration_is_no_worse_than_uniform_on_its_prompts(engines_dir):
    run = json.loads((engines_dir / SCHEDULES_FILE).read_text())["steps"]["12"]
    assert len(run["schedules"]["3"]) == math.ceil(12 / 3) and run["schedules"]["3"][0] == 0
    error = run["latent_error"]["3"]
    assert error["calibrated"] <= error["uniform"]
    assert len(run["feature_change"]) == len(run["output_change"]) == 12


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_calibrated_request_spends_exactly_its_budget_on_the_calibrated_steps(sd, engines_dir, scheduler):
    chosen = deep_steps(sd, steps=12, seed=1, scheduler=scheduler, cache_interval=3, cache_schedule="calibrated")
    assert chosen == schedule(engines_dir)  # steps matched by timestep: the same under another scheduler


def test_img2img_follows_the_calibrated_steps_in_its_tail(sd, engines_dir):
    init = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    request = dict(steps=12, seed=1, scheduler="ddim", cache_interval=3, cache_schedule="calibrated")
    chosen = deep_steps(sd, init_image=init, strength=0.5, **request)  # the last 6 of 12 steps
    assert chosen == sorted({0} | {k - 6 for k in schedule(engines_dir) if k >= 6})


@pytest.mark.parametrize(
    "request_fields, words",
    [
        ({"steps": 10, "cache_interval": 3}, "calibrated for 12 steps, not 10"),
        ({"steps": 12, "cache_interval": 2}, "calibrated for N = 3 at 12 steps"),
    ],
)
def test_uncalibrated_steps_or_interval_refused(sd, request_fields, words):
    with pytest.raises(InvalidRequest, match=words):
        sd(PROMPT, cache_schedule="calibrated", **request_fields)


def copy_engines(engines_dir, tmp_path, change=None):
    engines = tmp_path / "engines"
    shutil.copytree(engines_dir, engines)
    if change is not None:
        change(engines / SCHEDULES_FILE)
    return StableDiffusion.from_engines(engines)


def another_model(path):
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "fingerprint": "0" * 64}))


@pytest.mark.parametrize(
    "change, words",
    [
        (another_model, "calibrated on another model or DeepCache split"),
        (lambda path: path.write_text('{"format": 1, "stee'), "not a readable DeepCache calibration"),
        (lambda path: path.unlink(), "these engines have no calibration"),
    ],
)
def test_a_calibration_of_other_engines_is_refused_and_the_rest_serves(engines_dir, tmp_path, change, words):
    sd = copy_engines(engines_dir, tmp_path, change)
    with pytest.raises(InvalidRequest, match=words):
        sd(PROMPT, steps=12, cache_interval=3, cache_schedule="calibrated")
    assert sd(PROMPT, steps=3, seed=1, scheduler="ddim", cache_interval=3).stats.unet_deep_calls == 1


def test_cache_entries_are_scoped_by_calibration_and_threshold(sd):
    from voltacache.request import Request

    calibrated = Request(PROMPT, steps=12, cache_interval=3, cache_schedule="calibrated")
    assert sd.cache_scope(calibrated)["calibration"] == sd.calibration.id and sd.calibration.id
    adaptive = Request(PROMPT, cache_schedule="adaptive", refresh_threshold=0.3)
    assert sd.cache_scope(adaptive)["refresh_threshold"] == 0.3
    # the default threshold scopes as itself; a fixed schedule has no threshold nor calibration
    assert (
        sd.cache_scope(Request(PROMPT, cache_schedule="adaptive"))["refresh_threshold"]
        == adaptive.replace(refresh_threshold=None).threshold
    )
    assert {"refresh_threshold", "calibration"}.isdisjoint(sd.cache_scope(Request(PROMPT, cache_interval=3)))


def test_adaptive_refreshes_where_its_rule_says_on_the_latents_it_read(sd):
    """Replays the rule on the latents each step read (DDIM feeds the latents unscaled, the pair stacked)."""
    from voltacache.pipeline.deepcache import AdaptiveSchedule

    log, samples = [], []

    class Sampler(StepRecorder):
        def infer(self, feeds):
            samples.append(feeds["sample"][:1].copy())
            return super().infer(feeds)

    runners = {**sd.runners, **{n: Sampler(sd.runners[n], log, n) for n in (UNET_DEEP, UNET_SHALLOW)}}
    result = StableDiffusion(runners, sd.export, sd.tokenizers)(
        PROMPT, steps=12, seed=3, scheduler="ddim", cache_schedule="adaptive", refresh_threshold=0.05
    )
    replay = AdaptiveSchedule(0.05)
    expected = [k for k, x in enumerate(samples) if replay.due(k, x)]
    assert [k for k, (name, _) in enumerate(log) if name == UNET_DEEP] == expected
    assert 1 < result.stats.unet_deep_calls == len(expected) < 12


@pytest.mark.slow  # two short calibrations of the tiny model
def test_the_advice_for_a_broken_calibration_is_advice_calibrate_accepts(engines_dir, tmp_path):
    """A torn calibration says `calibrate --force`, and calibrate --force replaces it (it wrote it); a file
    copied in from elsewhere says to move it out, and after that calibrate writes one."""
    import re

    from helpers import cli

    from voltacache.outputs import ENGINES

    engines = tmp_path / "engines"
    shutil.copytree(engines_dir, engines)
    (engines / SCHEDULES_FILE).write_text('{"format": 1, "stee')
    with pytest.raises(InvalidRequest, match="not a readable DeepCache calibration") as refused:
        StableDiffusion.from_engines(engines).check(
            Request(PROMPT, steps=12, cache_interval=3, cache_schedule="calibrated")
        )
    advice = re.search(r"run `voltacache (calibrate [^`]*)`", str(refused.value)).group(1).split()
    assert advice == ["calibrate", "--engines", str(engines), "--force"]
    calibrate_args = ["--steps", "4", "--intervals", "2", "--prompts", str(prompt_file(tmp_path))]
    assert cli(*advice, *calibrate_args).exit_code == 0
    assert json.loads((engines / SCHEDULES_FILE).read_text())["steps"].keys() == {"4"}

    record = json.loads((engines / "engines.json").read_text())
    record["owned"].remove(SCHEDULES_FILE)  # as if the user had copied it in
    (engines / "engines.json").write_text(json.dumps(record))
    assert SCHEDULES_FILE not in ENGINES.owned(engines)
    with pytest.raises(InvalidRequest, match="calibrate did not write deepcache_schedules.json in these engines: move"):
        StableDiffusion.from_engines(engines).check(
            Request(PROMPT, steps=12, cache_interval=3, cache_schedule="calibrated")
        )
    result = cli("calibrate", "--engines", engines, "--force", *calibrate_args)
    assert result.exit_code == 2 and "voltacache did not write it" in result.stderr
    (engines / SCHEDULES_FILE).rename(tmp_path / "theirs.json")
    assert cli("calibrate", "--engines", engines, *calibrate_args).exit_code == 0
    assert SCHEDULES_FILE in ENGINES.owned(engines)


def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red square on a blue background\n")
    return path
