"""Shapes placed anywhere (voltacache.shapes.placement) and the shipped ControlNet that puts them where a mask says."""

import numpy as np
import pytest

from voltacache.shapes import placement
from voltacache.shapes.dataset import COLORS, SHAPES, TRAIN

WEIGHTS = placement.__file__.rsplit("/shapes/", 1)[0] + "/weights/shapes-controlnet"


def test_control_image_is_white_shape_on_black():
    image = placement.control_image("square", (0.25, 0.75, 0.3))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
    assert image[48, 16, 0] == 255 and image[16, 48, 0] == 0  # the box's center, the opposite corner
    mask = image[..., 0] > 127
    assert abs(mask.mean() - 0.3**2) < 0.01  # a square fills its box


@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_shape_is_found_where_its_control_image_is(shape):
    rng = np.random.default_rng(7)
    pairs = [(color, background) for color in COLORS for background in COLORS if color != background][::5]
    for color, background in pairs:
        box = placement.random_box(rng)
        image = placement.render_at(color, shape, background, box)
        control = placement.control_image(shape, box)
        assert placement.iou(placement.drawn_mask(image), control) > 0.9, (color, background, box)


def test_random_boxes_stay_inside_and_reach_the_corners():
    rng = np.random.default_rng(0)
    boxes = np.array([placement.random_box(rng) for _ in range(2000)])
    cx, cy, side = boxes.T
    assert side.min() >= 0.3 and side.max() <= 0.5
    assert (cx - side / 2 > 0).all() and (cx + side / 2 < 1).all() and (cy - side / 2 > 0).all()
    assert (cy + side / 2 < 1).all()
    assert cx.min() < 0.22 and cx.max() > 0.78 and cy.min() < 0.22 and cy.max() > 0.78
    for shape in SHAPES:  # the whole shape inside: nothing on the outermost pixels
        control = placement.control_image(shape, tuple(boxes[0]))
        assert control[0].max() == 0 and control[-1].max() == 0


def test_boxes_are_fractions_of_the_side():
    small = placement.control_image("circle", (0.3, 0.6, 0.4), size=32)[..., 0] > 127
    large = placement.control_image("circle", (0.3, 0.6, 0.4), size=64)[..., 0] > 127
    assert placement.iou(small.repeat(2, 0).repeat(2, 1), large) > 0.9


def test_iou_edge_cases():
    empty = np.zeros((8, 8), bool)
    full = np.ones((8, 8), bool)
    half = np.zeros((8, 8), bool)
    half[:4] = True
    assert placement.iou(empty, empty) == 1.0
    assert placement.iou(empty, full) == 0.0 and placement.iou(full, empty) == 0.0
    assert placement.iou(full, full) == 1.0
    assert placement.iou(half, full) == 0.5 == placement.iou(full, half)
    assert placement.iou(half, ~half) == 0.0
    # a control image and a (shape, box) pair read as the same mask
    box = (0.5, 0.4, 0.35)
    assert placement.iou(placement.control_image("triangle", box), ("triangle", box)) == 1.0
    with pytest.raises(ValueError, match="differ"):
        placement.iou(empty, np.zeros((4, 4), bool))


def test_drawn_mask_of_a_flat_image_is_empty():
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert not placement.drawn_mask(flat).any()


def test_adherence_is_the_mean_iou():
    rng = np.random.default_rng(3)
    boxes = [placement.random_box(rng) for _ in range(3)]
    images = [placement.render_at("red", "circle", "blue", b) for b in boxes]
    assert placement.adherence(images, [("circle", b) for b in boxes]) > 0.9
    # against the wrong boxes: lower, and the same whichever way a target is given
    shifted = boxes[1:] + boxes[:1]
    as_pairs = placement.adherence(images, [("circle", b) for b in shifted])
    as_controls = placement.adherence(images, [placement.control_image("circle", b) for b in shifted])
    assert as_pairs == as_controls < 0.9
    with pytest.raises(ValueError):
        placement.adherence(images, boxes[:2])


def test_placement_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, voltacache.shapes.placement; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.slow
def test_shipped_controlnet_puts_the_shape_where_the_mask_says():
    import os

    if not os.path.isdir(WEIGHTS):
        pytest.skip("no shipped ControlNet weights")
    import torch
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from PIL import Image

    from voltacache.compile.presets import trained_pipeline

    pipe = trained_pipeline("shapes")
    controlnet = ControlNetModel.from_pretrained(WEIGHTS, torch_dtype=torch.float32)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    plain = StableDiffusionPipeline(**pipe.components | {"scheduler": scheduler, "requires_safety_checker": False})
    with_cn = StableDiffusionControlNetPipeline(
        **plain.components | {"controlnet": controlnet, "requires_safety_checker": False}
    )
    rng = np.random.default_rng(11)
    combos = [TRAIN[i] for i in (0, 25, 53, 77, 101, 130)]  # all three shapes, spread over the colors
    boxes = [placement.random_box(rng) for _ in combos]
    captions = [c.caption for c in combos]
    controls = [Image.fromarray(placement.control_image(c.shape, b)) for c, b in zip(combos, boxes)]
    common = {"num_inference_steps": 10, "guidance_scale": 7.5, "output_type": "np"}
    seeds = [torch.Generator().manual_seed(100 + i) for i in range(len(combos))]
    placed = with_cn(captions, image=controls, generator=seeds, **common).images
    seeds = [torch.Generator().manual_seed(100 + i) for i in range(len(combos))]
    free = plain(captions, generator=seeds, **common).images
    targets = [(c.shape, b) for c, b in zip(combos, boxes)]
    with_score, without_score = placement.adherence(placed, targets), placement.adherence(free, targets)
    assert with_score > 0.5 and with_score > without_score + 0.2, (with_score, without_score)
