"""The procedural shapes dataset: deterministic, captioned right, with held-out pairs kept out of training."""

from __future__ import annotations

import numpy as np
import pytest

from voltacache.shapes import dataset
from voltacache.shapes.checker import srgb_to_lab


def test_same_seed_same_images_different_seed_different():
    images, captions = dataset.sample(16, seed=3)
    again, captions_again = dataset.sample(16, seed=3)
    other, _ = dataset.sample(16, seed=4)
    assert images.dtype == np.uint8 and images.shape == (16, 64, 64, 3)
    assert np.array_equal(images, again) and captions == captions_again
    assert not np.array_equal(images, other)


def test_render_is_deterministic_from_the_generator_and_varies_position_and_size():
    first = dataset.render("red", "circle", "blue", np.random.default_rng(0))
    assert np.array_equal(first, dataset.render("red", "circle", "blue", np.random.default_rng(0)))
    assert not np.array_equal(first, dataset.render("red", "circle", "blue", np.random.default_rng(1)))
    with pytest.raises(ValueError, match="unknown shape"):
        dataset.render("red", "hexagon", "blue", np.random.default_rng(0))


def test_render_draws_the_captioned_colors_antialiased():
    image = dataset.render("orange", "square", "yellow", np.random.default_rng(0))
    assert tuple(image[0, 0]) == dataset.COLORS["yellow"]
    assert tuple(image[32, 32]) == dataset.COLORS["orange"]
    # Box-filtered supersampling leaves edge pixels between the two colors.
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 2


def test_captions_match_the_combination():
    combo = dataset.Combo("purple", "triangle", "white")
    assert combo.caption == "a purple triangle on a white background"
    rng = np.random.default_rng(0)
    _, captions = dataset.sample(200, rng)
    assert set(captions) <= {c.caption for c in dataset.TRAIN}


def test_every_combination_once_shape_color_never_the_background():
    assert len(dataset.ALL) == 8 * 7 * 3 == len(set(dataset.ALL))
    assert all(c.color != c.background for c in dataset.ALL)
    assert set(dataset.TRAIN) | set(dataset.HELD_OUT) == set(dataset.ALL)


def test_held_out_pairs_are_spread_and_never_trained():
    pairs = dataset.HELD_OUT_PAIRS
    assert len(pairs) >= 8
    trained_pairs = {(c.color, c.background) for c in dataset.TRAIN}
    assert not trained_pairs & set(pairs)
    assert len(dataset.HELD_OUT) == 3 * len(pairs)
    assert {color for color, _ in pairs} == set(dataset.COLORS)
    assert {background for _, background in pairs} == set(dataset.COLORS)
    low_contrast = {("orange", "yellow"), ("yellow", "orange"), ("red", "orange"), ("orange", "red")}
    assert low_contrast & set(pairs)


def test_evaluation_captions_cover_trained_and_held_out_marked():
    captions = dataset.evaluation_captions()
    assert len(captions) == len(dataset.ALL) == len({c for c, _ in captions})
    assert {c for c, held in captions if not held} == {c.caption for c in dataset.TRAIN}
    assert {c for c, held in captions if held} == {c.caption for c in dataset.HELD_OUT}


def test_palette_colors_are_distinct_even_the_close_pairs():
    lab = {name: srgb_to_lab(np.array(rgb)) for name, rgb in dataset.COLORS.items()}
    names = list(lab)
    gaps = {(a, b): np.linalg.norm(lab[a] - lab[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    assert min(gaps.values()) > 25, min(gaps, key=gaps.get)
