"""Shapes placed anywhere in the image, their masks, and how well a generated image puts the shape there.

The shapes model draws its shape near the center (dataset.render jitters it by 8% at most), so a caption alone
cannot ask for a place. A ControlNet can: its control image is the shape's mask, white where the shape should
be and black elsewhere (scripts/train_shapes_controlnet.py trains one, voltacache/weights/shapes-controlnet).
Placement adherence is then the IoU between the mask asked for and the region the image shows as the shape,
read back with the checker's segmentation (no learned model).

A box is (cx, cy, side), all three as fractions of the image side: the shape's center and the side of its
square bounding box. Fractions, not pixels, so one box means the same place at any image size; a triangle
points up and is as wide as it is tall, a circle is inscribed in the box, as dataset.render draws them.

numpy, scipy and PIL only (as the checker): no torch, so tests and scoring load fast.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .checker import as_array, shape_mask, srgb_to_lab
from .dataset import COLORS, SHAPES, SUPERSAMPLE, _shape_polygon

Box = tuple[float, float, float]
SIDE_RANGE = (0.3, 0.5)  # random_box: of the image side; the shapes model's own 40-60%, shifted down to move more
# A pixel the shape covers half of is in its mask (control value 128 of 255 after rounding); its rendered color
# rounds to either side of the midpoint, so drawn_mask's coverage threshold sits a hair below 1/2. Half-covered
# pixels are common: the 4x supersampling quantizes coverage to sixteenths.
HALF = 0.49
MARGIN = 1 / 32  # random_box keeps the box this far (of the side) inside the image: its antialiased edge included


def _draw(canvas: Image.Image, shape: str, box: Box, fill) -> None:
    """Draw the shape into a supersampled canvas; `box` in fractions of the side."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    big = canvas.size[0]
    cx, cy, side = (float(v) * big for v in box)
    draw = ImageDraw.Draw(canvas)
    polygon = _shape_polygon(shape, cx, cy, side)
    if polygon is None:
        draw.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def render_at(color: str, shape: str, background: str, box: Box, size: int = 64) -> np.ndarray:
    """One image, uint8 (size, size, 3), of the shape in `box`: drawn as dataset.render draws (4x supersampled,
    box-filtered down), so it looks like the training images the shapes model learned from, only elsewhere."""
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), COLORS[background])
    _draw(canvas, shape, box, COLORS[color])
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))


def control_image(shape: str, box: Box, size: int = 64) -> np.ndarray:
    """The ControlNet's input, uint8 (size, size, 3): the shape white on black, exactly where render_at draws it.

    Drawn the same way, so the edge pixels are gray in proportion to how much of them the shape covers: the
    mask then carries the sub-pixel position too. Three equal channels because a ControlNet reads an RGB image.
    """
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    _draw(canvas, shape, box, 255)
    gray = np.asarray(canvas.resize((size, size), Image.Resampling.BOX))
    return np.repeat(gray[..., None], 3, axis=-1)


def random_box(rng: np.random.Generator, size: int = 64) -> Box:
    """A box anywhere in the image: side 30-50% of the image's, center uniform over where the whole shape (and a
    1/32 margin for its antialiased edge) stays inside. Positions span the whole image, corners included, unlike
    the shapes model's centered training images; `size` is accepted for symmetry (boxes are fractions)."""
    del size  # boxes are fractions of the side
    side = float(rng.uniform(*SIDE_RANGE))
    low, high = side / 2 + MARGIN, 1 - side / 2 - MARGIN
    cx, cy = rng.uniform(low, high, size=2).tolist()
    return (cx, cy, side)


def mask_of(target, size: int | None = None) -> np.ndarray:
    """A bool (size, size) mask from a bool mask, a control image (white > 127 is the shape) or a (shape, box)
    pair (its control image at `size`, 64 by default)."""
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], str):
        shape, box = target
        return control_image(shape, box, size or 64)[..., 0] > 127
    array = np.asarray(target)
    if array.dtype == bool:
        return array
    if array.ndim == 3:
        array = array[..., 0]
    if array.dtype != np.uint8:  # float in [0, 1]
        return array > 0.5
    return array > 127


def drawn_mask(image) -> np.ndarray:
    """bool (size, size): where the image shows its shape, found by the checker's segmentation and then drawn to
    the half-coverage edge.

    The checker's part (as checker.read_image does it): the background is the median CIELAB color of the border
    ring, 1/16 of the side wide (a shape placed at the edge covers less than half of the ring, so the median stays
    the background's), the shape the largest region farther from it than half the image's contrast, holes filled.
    That edge sits where the CIELAB distance is halfway, which for a dark shape on a mid background is well off
    the pixel that the shape half covers (a small black triangle on purple lost 13% IoU against its own mask).
    So each pixel near that region gets a coverage: its position between the background's and the shape's median
    sRGB color (antialiasing and the VAE both blend in sRGB), and the mask is where it is 1/2 or more, the same edge
    as control_image's. No shape found: all False.
    """
    rgb = as_array(image)
    lab = srgb_to_lab(rgb)
    size = min(rgb.shape[:2])
    border = max(1, size // 16)
    ring = np.ones(rgb.shape[:2], bool)
    ring[border:-border, border:-border] = False
    found = shape_mask(lab, np.median(lab[ring], axis=0))
    if found is None:
        return np.zeros(rgb.shape[:2], bool)
    pixels = rgb.astype(np.float64)
    interior = ndimage.binary_erosion(found, iterations=2)
    foreground = np.median(pixels[interior if interior.sum() >= 9 else found], axis=0)
    background = np.median(pixels[ring], axis=0)
    direction = foreground - background
    coverage = (pixels - background) @ direction / max(float(direction @ direction), 1e-6)
    near = ndimage.binary_dilation(found, iterations=2)
    return ndimage.binary_fill_holes((coverage >= HALF) & near)


def iou(a, b) -> float:
    """Intersection over union of two masks (anything mask_of reads): 1.0 when both are empty, as they agree,
    and 0.0 when one is. Symmetric; a shape drawn right but shifted by a third of its side scores about 0.5."""
    a, b = mask_of(a), mask_of(b)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} and {b.shape}")
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def adherence(images: Sequence, boxes_or_masks: Sequence) -> float:
    """Mean IoU between the shape each image shows (drawn_mask) and where it was asked for: per image a bool mask,
    a control image, or a (shape, box) pair. One number for placement adherence; 0 where no shape is found."""
    images = list(images)
    targets = list(boxes_or_masks)
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} boxes or masks")
    if not images:
        raise ValueError("no images")
    scores = []
    for image, target in zip(images, targets):
        drawn = drawn_mask(image)
        scores.append(iou(drawn, mask_of(target, drawn.shape[0])))
    return float(np.mean(scores))
