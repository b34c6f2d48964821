import json

import numpy as np
import pytest
import torch

from voltacache.presets import TRAINED, component_config, random_pipeline


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
