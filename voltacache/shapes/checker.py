"""Read color, shape and background back out of a shapes image by plain image analysis, to score adherence.

No learned model: the background is the border's median color, the shape is the largest region far from it,
and its class comes from geometry. Colors are compared in CIELAB, where distance follows perceived
difference, so orange on yellow separates as well as black on white. Medians and a threshold relative to the
image's own contrast keep it working on the blurry, slightly off-hue output of a small diffusion model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .dataset import COLORS, SHAPES

UNKNOWN = "unknown"
MIN_AREA = 0.02  # of the image: smaller regions are noise, not a shape
MIN_CONTRAST = 12.0  # CIELAB delta-E from the background: below this nothing stands out
CIRCLE_FILL = np.pi / 4  # of its bounding box
CAPTION = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")


@dataclass(frozen=True)
class Reading:
    color: str
    shape: str
    background: str


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 or [0, 255] float sRGB (..., 3) -> CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array(
        [[0.4124564, 0.2126729, 0.0193339], [0.3575761, 0.7151522, 0.1191920], [0.1804375, 0.0721750, 0.9503041]]
    )
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


PALETTE_NAMES = list(COLORS)
PALETTE_LAB = srgb_to_lab(np.array([COLORS[n] for n in PALETTE_NAMES]))


def nearest_color(lab: np.ndarray) -> str:
    return PALETTE_NAMES[int(np.argmin(np.linalg.norm(PALETTE_LAB - lab, axis=-1)))]


def as_array(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8:  # float output of a pipeline, in [0, 1]
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return image[..., :3]


def shape_mask(lab: np.ndarray, background: np.ndarray) -> np.ndarray | None:
    """The largest connected region that differs from the background, holes filled; None if there is none."""
    distance = np.linalg.norm(lab - background, axis=-1)
    peak = np.percentile(distance, 99)
    if peak < MIN_CONTRAST:
        return None
    # Half the image's own contrast: the midpoint of a blurred edge, whatever the pair's contrast is.
    labels, count = ndimage.label(distance > peak / 2)
    if count == 0:
        return None
    sizes = ndimage.sum(np.ones_like(distance), labels, index=range(1, count + 1))
    mask = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    return mask if mask.mean() >= MIN_AREA else None


def classify_shape(mask: np.ndarray) -> str:
    """circle, square or triangle from the region's geometry within its bounding box; "unknown" for a blob.

    Drawn shapes are as wide as tall and fill 50% (triangle), 79% (circle) or 100% (square) of their box;
    each decision is taken halfway between two ideal shapes, so a blurred or rounded one goes to the shape it
    is nearer to, and bounds on aspect and fill keep a smear from passing as a shape.
    """
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(np.float64)
    h, w = box.shape
    if min(h, w) < 3 or not 0.67 <= w / h <= 1.5:
        return UNKNOWN
    fill = box.mean()
    # An upward triangle narrows to the top: a quarter up its box it is a third as wide as a quarter from the
    # bottom; circles and squares are as wide at both heights. 0.67 is halfway.
    widths = box.sum(axis=1)
    upper = widths[int(0.15 * h) : max(int(0.15 * h) + 1, int(0.35 * h))].mean()
    lower = widths[int(0.65 * h) : max(int(0.65 * h) + 1, int(0.85 * h))].mean()
    if upper / lower < 0.67:
        return "triangle" if 0.38 <= fill < CIRCLE_FILL else UNKNOWN
    if fill < 0.65:
        return UNKNOWN
    # Squareness, 0 for a circle and 1 for a square: how much of the box it fills beyond a circle's 79%, and
    # how much of the corners outside the inscribed ellipse it covers. A rounded square scores in between;
    # it is called a square when it is nearer to one than to a circle.
    y, x = np.mgrid[0:h, 0:w]
    outside = np.hypot((y + 0.5 - h / 2) / (h / 2), (x + 0.5 - w / 2) / (w / 2)) > 1.0
    corners = box[outside].mean() if outside.any() else 0.0
    squareness = (min(1.0, (fill - CIRCLE_FILL) / (1 - CIRCLE_FILL)) + corners) / 2
    return "square" if squareness > 0.5 else "circle"


def read_image(image: np.ndarray | Image.Image, border: int | None = None) -> Reading:
    """The (color, shape, background) an image shows; fields it cannot tell are "unknown"."""
    rgb = as_array(image)
    lab = srgb_to_lab(rgb)
    size = min(rgb.shape[:2])
    border = border or max(1, size // 16)
    ring = np.ones(rgb.shape[:2], bool)
    ring[border:-border, border:-border] = False
    background_lab = np.median(lab[ring], axis=0)
    background = nearest_color(background_lab)
    mask = shape_mask(lab, background_lab)
    if mask is None:
        return Reading(UNKNOWN, UNKNOWN, background)
    # The interior, away from the blended edge; a thin shape keeps its whole mask.
    interior = ndimage.binary_erosion(mask, iterations=2)
    region = interior if interior.sum() >= 9 else mask
    color = nearest_color(np.median(lab[region], axis=0))
    return Reading(color, classify_shape(mask), background)


def parse_caption(caption: str) -> tuple[str, str, str]:
    """(color, shape, background) of "a {color} {shape} on a {background} background"."""
    match = CAPTION.match(caption.strip().lower())
    if not match or match[1] not in COLORS or match[2] not in SHAPES or match[3] not in COLORS:
        raise ValueError(
            f'not a shapes caption: {caption!r}; give "a COLOR SHAPE on a COLOR background" with SHAPE one of '
            f"{', '.join(SHAPES)} and COLOR one of {', '.join(COLORS)}"
        )
    return match[1], match[2], match[3]


def check(image: np.ndarray | Image.Image, caption: str) -> dict[str, bool]:
    return compare(read_image(image), caption)


def compare(reading: Reading, caption: str) -> dict[str, bool]:
    """Which of the caption's fields the reading got right, and whether all of them."""
    color, shape, background = parse_caption(caption)
    result = {
        "color_ok": reading.color == color,
        "shape_ok": reading.shape == shape,
        "background_ok": reading.background == background,
    }
    return result | {"all_ok": all(result.values())}
