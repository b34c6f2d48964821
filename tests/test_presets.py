import numpy as np
import torch

from voltacache.presets import component_config, random_pipeline


def generate(pipe, seed):
    return pipe(
        "a red circle", num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(seed), output_type="np"
    ).images[0]


def test_tiny_keeps_sd15_block_types():
    for component in ("unet", "vae"):
        sd15, tiny = component_config(component, "sd15"), component_config(component, "tiny")
        for key in ("down_block_types", "up_block_types"):
            assert sd15[key] == tiny[key]
    assert component_config("unet", "sd15")["block_out_channels"] == [320, 640, 1280, 1280]


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
