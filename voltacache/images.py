"""Images in and out, numpy and PIL only (no torch): read by the CLI, the pipeline and the Triton models alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InvalidRequest


def too_large(e: Exception) -> str:
    """PIL refuses images past its decompression-bomb limit (about 179 megapixels): say so, and what to do."""
    return f"too large to read safely ({e}); give an image near the size generated (e.g. 512x512)"


def read_image(source, name: str = "init_image") -> np.ndarray:
    """An image file, PIL image or array as uint8 (height, width, 3) RGB; an unreadable one is refused by name."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        return source
    try:
        image = source if isinstance(source, Image.Image) else Image.open(Path(source))
        return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise InvalidRequest(f"{name} {source}: no such file") from None
    except IsADirectoryError:
        raise InvalidRequest(f"{name} {source}: is a folder, not an image file") from None
    except Image.DecompressionBombError as e:
        raise InvalidRequest(f"{name} {source}: {too_large(e)}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidRequest(f"{name} {source}: not a readable image ({e})") from None


def read_mask(source, name: str = "mask_image") -> np.ndarray:
    """A mask file, PIL image or array as uint8 pixels: (height, width) from a grayscale file, RGB otherwise
    (converted to gray after resizing, by `fit_mask`, as diffusers' mask processor does)."""
    from PIL import Image

    if isinstance(source, np.ndarray):
        return source
    try:
        image = source if isinstance(source, Image.Image) else Image.open(Path(source))
        return np.asarray(image.convert("L") if image.mode in ("1", "L") else image.convert("RGB"))
    except FileNotFoundError:
        raise InvalidRequest(f"{name} {source}: no such file") from None
    except IsADirectoryError:
        raise InvalidRequest(f"{name} {source}: is a folder, not an image file") from None
    except Image.DecompressionBombError as e:
        raise InvalidRequest(f"{name} {source}: {too_large(e)}") from None
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise InvalidRequest(f"{name} {source}: not a readable image ({e})") from None


def fit_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """An inpainting mask as diffusers' mask processor makes it: resized to the engines' size (Lanczos),
    grayscale, binarized at 0.5 (1: repaint, 0: keep); float32 (1, 1, height, width)."""
    from PIL import Image

    image = Image.fromarray(mask[..., 0] if mask.ndim == 3 and mask.shape[2] == 1 else mask)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    gray = np.asarray(image.convert("L")).astype(np.float32) / 255.0
    return (gray >= 0.5).astype(np.float32)[None, None]


def fit_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """An init image at the engines' size: resized with Lanczos where it differs (in process and served alike)."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.LANCZOS))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, rounded as diffusers' image processor does."""
    image = np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return (image * 255).round().astype(np.uint8)


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 (height, width, 3) -> the [-1, 1] NCHW batch of one the VAE encoder takes."""
    return (image.astype(np.float32) / 255.0 * 2 - 1).transpose(2, 0, 1)[None]


def canny(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """A photo's Canny edges as the control image a Canny ControlNet was trained on: white edges on black, RGB
    (OpenCV, the thresholds of diffusers' ControlNet examples)."""
    import cv2

    edges = cv2.Canny(np.ascontiguousarray(image), low, high)
    return np.repeat(edges[..., None], 3, axis=2)


# control image preprocessors (generate --control-preprocess): a photo in, the control image out
PREPROCESSORS = {"none": lambda image: image, "canny": canny}
