"""The adherence checker: exact on drawn images, robust to the blur and hue drift of a small model's output."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from voltacache.shapes import dataset
from voltacache.shapes.checker import UNKNOWN, Reading, check, parse_caption, read_image

LOW_CONTRAST = [("orange", "yellow"), ("yellow", "orange"), ("red", "orange"), ("orange", "red")]


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return (
        np.clip(ndimage.gaussian_filter(image.astype(np.float64), (sigma, sigma, 0)), 0, 255).round().astype(np.uint8)
    )


def shift_hue(image: np.ndarray, degrees: float) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(image).convert("HSV")).astype(np.int64)
    hsv[..., 0] = (hsv[..., 0] + round(degrees / 360 * 256)) % 256
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))


def add_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image + rng.normal(0, std, image.shape), 0, 255).round().astype(np.uint8)


def rendered(combo: dataset.Combo, rng: np.random.Generator) -> np.ndarray:
    return dataset.render(combo.color, combo.shape, combo.background, rng)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reads_every_combination_of_ground_truth(seed):
    rng = np.random.default_rng(seed)
    wrong = [c.caption for c in dataset.ALL if not check(rendered(c, rng), c.caption)["all_ok"]]
    assert wrong == []


@pytest.mark.parametrize("color,background", LOW_CONTRAST)
@pytest.mark.parametrize("shape", dataset.SHAPES)
def test_low_contrast_pairs(color, shape, background):
    for seed in range(5):
        image = dataset.render(color, shape, background, np.random.default_rng(seed))
        assert read_image(image) == Reading(color, shape, background)


DEGRADATIONS = {
    "blur sigma 1": lambda image, rng: blur(image, 1.0),
    "blur sigma 2": lambda image, rng: blur(image, 2.0),
    "hue +10 degrees": lambda image, rng: shift_hue(image, 10),
    "hue -10 degrees": lambda image, rng: shift_hue(image, -10),
    "noise std 8": lambda image, rng: add_noise(image, 8, rng),
    "blur, hue +8, noise 6": lambda image, rng: add_noise(shift_hue(blur(image, 1.0), 8), 6, rng),
}


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_robust_to_mild_degradation(name):
    rng = np.random.default_rng(7)
    degrade = DEGRADATIONS[name]
    results = [check(degrade(rendered(c, rng), rng), c.caption) for c in dataset.ALL]
    assert np.mean([r["all_ok"] for r in results]) >= 0.97
    low = [r["all_ok"] for c, r in zip(dataset.ALL, results) if (c.color, c.background) in LOW_CONTRAST]
    assert np.mean(low) >= 0.9


def test_wrong_caption_is_caught_field_by_field():
    image = dataset.render("red", "circle", "blue", np.random.default_rng(0))
    assert check(image, "a red circle on a blue background")["all_ok"]
    assert check(image, "a red square on a blue background") == {
        "color_ok": True,
        "shape_ok": False,
        "background_ok": True,
        "all_ok": False,
    }
    assert not check(image, "a orange circle on a blue background")["color_ok"]
    assert not check(image, "a red circle on a purple background")["background_ok"]


@pytest.mark.parametrize("rounding", [0.15, 0.3])
def test_rounded_square_is_a_square_and_rounded_triangle_a_triangle(rounding):
    # What a small diffusion model draws: corners rounded off, still nearer the named shape than another.
    big = Image.new("RGB", (256, 256), dataset.COLORS["white"])
    side = 120
    ImageDraw.Draw(big).rounded_rectangle(
        [68, 68, 68 + side, 68 + side], radius=int(rounding * side), fill=dataset.COLORS["blue"]
    )
    square = np.asarray(big.resize((64, 64), Image.Resampling.BOX))
    assert read_image(square) == Reading("blue", "square", "white")
    triangle = dataset.render("blue", "triangle", "white", np.random.default_rng(0))
    assert read_image(blur(triangle, 1 + 6 * rounding)).shape == "triangle"


def test_blank_image_has_no_shape_and_does_not_crash():
    blank = np.full((64, 64, 3), dataset.COLORS["green"], np.uint8)
    assert read_image(blank) == Reading(UNKNOWN, UNKNOWN, "green")
    assert not check(blank, "a red circle on a green background")["all_ok"]


def test_a_smear_is_not_a_shape():
    smear = np.full((64, 64, 3), dataset.COLORS["white"], np.uint8)
    smear[28:36, 8:56] = dataset.COLORS["black"]  # 6:1 bar: no drawn shape looks like this
    assert read_image(smear) == Reading("black", UNKNOWN, "white")


def test_accepts_pil_images_and_float_pipeline_output():
    image = dataset.render("blue", "triangle", "white", np.random.default_rng(0))
    expected = Reading("blue", "triangle", "white")
    assert read_image(Image.fromarray(image)) == expected
    assert read_image(image.astype(np.float32) / 255) == expected


def test_parse_caption():
    assert parse_caption("a orange square on a yellow background") == ("orange", "square", "yellow")
    assert parse_caption("An orange square on a yellow background") == ("orange", "square", "yellow")
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a cat on a mat")
    with pytest.raises(ValueError):
        parse_caption("a pink circle on a red background")
