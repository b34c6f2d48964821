import json

import numpy as np
import pytest
import torch
from helpers import listing, one_error_line

from voltacache.compile.presets import TRAINED, component_config, random_pipeline


def generate(pipe, seed):
    return pipe(
        "a red circle", num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(seed), output_type="np"
    ).images[0]


@pytest.mark.parametrize("preset", ["tiny", "shapes"])
def test_small_presets_keep_sd15_block_types(preset):
    for component in ("unet", "vae"):
        sd15, small = component_config(component, "sd15"), component_config(component, preset)
        for key in ("down_block_types", "up_block_types"):
            assert sd15[key] == small[key]
    assert component_config("unet", "sd15")["block_out_channels"] == [320, 640, 1280, 1280]


@pytest.mark.parametrize("preset, full", [("sd2-tiny", "sd2"), ("sdxl-tiny", "sdxl")])
def test_family_presets_keep_their_familys_topology(preset, full):
    small, real = component_config("unet", preset), component_config("unet", full)
    for key in ("down_block_types", "up_block_types", "use_linear_projection", "addition_embed_type"):
        assert small.get(key) == real.get(key)
    assert small["cross_attention_dim"] < real["cross_attention_dim"]
    pipe = random_pipeline(preset)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if full == "sd2" else "epsilon")
    pads = [pipe.tokenizer.pad_token, getattr(pipe, "tokenizer_2", None) and pipe.tokenizer_2.pad_token]
    assert pads == (["!", None] if full == "sd2" else ["<|endoftext|>", "!"])


def test_shapes_latent_width_agrees_across_unet_vae_and_shipped_weights():
    vae, unet = component_config("vae", "shapes"), component_config("unet", "shapes")
    assert unet["in_channels"] == unet["out_channels"] == vae["latent_channels"]
    shipped = {name: json.loads((TRAINED["shapes"] / name / "config.json").read_text()) for name in ("vae", "unet")}
    assert shipped["vae"]["latent_channels"] == shipped["unet"]["in_channels"] == vae["latent_channels"]


def test_same_seed_same_weights_and_image(tiny_pipe):
    again = random_pipeline("tiny", seed=0)
    a, b = tiny_pipe.unet.state_dict(), again.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(generate(tiny_pipe, 1), generate(again, 1))


def test_other_seed_other_weights(tiny_pipe):
    other = random_pipeline("tiny", seed=1)
    assert not torch.equal(tiny_pipe.unet.conv_in.weight, other.unet.conv_in.weight)


def test_tiny_makes_a_64px_image(tiny_pipe):
    image = generate(tiny_pipe, 0)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()


def init_tiny(*args):
    from typer.testing import CliRunner

    from voltacache.cli import app

    return CliRunner().invoke(app, ["init-tiny", *map(str, args)])


def test_init_tiny_replaces_its_own_pipeline_only_with_force(tiny_dir, tmp_path):
    import shutil

    from voltacache.compile.presets import PRESET_MARKER

    out = shutil.copytree(tiny_dir, tmp_path / "tiny")
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    one_error_line(init_tiny(out, "--seed", "3"), 2, f"OUT {out}: holds an earlier pipeline folder; pass --force")
    assert weights.read_bytes() == before
    result = init_tiny(out, "--seed", "3", "--force")
    assert result.exit_code == 0, result.output
    assert weights.read_bytes() != before and json.loads((out / PRESET_MARKER).read_text())["seed"] == 3
    assert listing(tmp_path) == ["tiny"]


def test_init_tiny_never_replaces_a_downloaded_pipeline(tiny_dir, tmp_path):
    import shutil

    from voltacache.compile.presets import PRESET_MARKER, write_pipeline
    from voltacache.errors import OutputExists

    out = shutil.copytree(tiny_dir, tmp_path / "sd15")  # a diffusers folder voltacache did not write
    (out / PRESET_MARKER).unlink()
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    one_error_line(init_tiny(out, "--force"), 2, f"OUT {out}: not a pipeline folder (no {PRESET_MARKER} in it)")
    with pytest.raises(OutputExists, match="not a pipeline folder"):
        write_pipeline(out, force=True)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert listing(tmp_path) == ["sd15"]


def test_init_tiny_refuses_a_users_single_file_before_writing_anything(tmp_path):
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"a user's checkpoint")
    result = init_tiny(tmp_path / "tiny", "--single-file", single, "--force")
    one_error_line(result, 2, f"--single-file {single}: not a single-file checkpoint")
    assert single.read_bytes() == b"a user's checkpoint"
    assert listing(tmp_path) == ["model.safetensors"]
