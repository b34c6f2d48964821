"""Captioned images of one flat shape on a flat background, drawn procedurally and deterministically."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

# Saturated but not pure primaries: closer to what a photo or a small model produces than #ff0000.
# orange/yellow and red/orange are the close pairs; they stay apart in hue and lightness.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 40),
    "green": (40, 155, 60),
    "blue": (35, 75, 200),
    "yellow": (245, 215, 45),
    "white": (245, 245, 240),
    "black": (20, 20, 25),
    "purple": (125, 45, 160),
    "orange": (245, 135, 30),
}
SHAPES = ("circle", "square", "triangle")
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: antialiased edges, like a natural image's


@dataclass(frozen=True)
class Combo:
    color: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


# (color, background) pairs never shown in training. Each color is held out once as a shape and once as a
# background, so no color is unseen, only the pairing; red on orange is one of the low-contrast pairs.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "orange"),
    ("green", "white"),
    ("blue", "yellow"),
    ("yellow", "purple"),
    ("white", "black"),
    ("black", "green"),
    ("purple", "red"),
    ("orange", "blue"),
)

ALL: tuple[Combo, ...] = tuple(
    Combo(color, shape, background)
    for color, background, shape in product(COLORS, COLORS, SHAPES)
    if color != background
)
HELD_OUT: tuple[Combo, ...] = tuple(c for c in ALL if (c.color, c.background) in HELD_OUT_PAIRS)
TRAIN: tuple[Combo, ...] = tuple(c for c in ALL if (c.color, c.background) not in HELD_OUT_PAIRS)


def evaluation_captions() -> list[tuple[str, bool]]:
    """Every trained combination, then the held-out ones, as (caption, held_out)."""
    return [(c.caption, False) for c in TRAIN] + [(c.caption, True) for c in HELD_OUT]


def _shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    half = side / 2
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":  # pointing up, base as wide as it is tall
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    return None


def render(color: str, shape: str, background: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One image, uint8 (size, size, 3): the shape spans 40-60% of the side, its center jittered by up to 8%."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    big = size * SUPERSAMPLE
    side = rng.uniform(0.4, 0.6) * big
    cx, cy = (big / 2 + rng.uniform(-0.08, 0.08, size=2) * big).tolist()
    canvas = Image.new("RGB", (big, big), COLORS[background])
    draw = ImageDraw.Draw(canvas)
    polygon = _shape_polygon(shape, cx, cy, side)
    if polygon is None:
        draw.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=COLORS[color])
    else:
        draw.polygon(polygon, fill=COLORS[color])
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))


def sample(
    n: int, seed: int | np.random.Generator = 0, combos: tuple[Combo, ...] = TRAIN, size: int = 64
) -> tuple[np.ndarray, list[str]]:
    """n images (uint8 [n, size, size, 3]) of combinations drawn uniformly from `combos`, and their captions."""
    rng = np.random.default_rng(seed)
    picks = [combos[i] for i in rng.integers(len(combos), size=n)]
    images = (
        np.stack([render(c.color, c.shape, c.background, rng, size) for c in picks])
        if n
        else np.zeros((0, size, size, 3), np.uint8)
    )
    return images, [c.caption for c in picks]
