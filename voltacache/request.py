"""One generation request, the same everywhere: the CLI, the in-process pipeline, the Triton client
and the Triton denoiser all carry a `Request`. Its defaults are written here once; `check()` runs at
the edge (CLI, client, pipeline) and again in the server; `to_triton()` / `from_triton()` are built
from the protocol's tensor table (voltacache.serving.protocol.REQUEST_TENSORS).

Torch-free on purpose: `generate --url` and the tokenizer/postprocess models import it without
torch or diffusers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .deepcache import CACHE_SCHEDULES, DEFAULT_REFRESH_THRESHOLD
from .errors import InvalidRequest
from .lora import check_loras
from .schedulers import SCHEDULERS

MAX_STEPS = 1000  # the trained schedule's length: every scheduler runs up to it
MAX_GUIDANCE = 50.0  # useful values are 1-15; far beyond it the image saturates to black
MAX_PROMPT_BYTES = 4096  # CLIP reads 77 tokens; kilobytes more are a client bug or abuse
MAX_SEED = 2**63 - 1  # SEED is an int64 on the wire
MAX_IMAGE_SIDE = 4096  # an init image is resized to the engines' size; larger is refused before decoding it
CACHE_MODES = ("on", "off", "refresh")  # the cross-request cache for this request; refresh: regenerate, store
# SDXL's size conditioning, each (height, width) or (top, left) in pixels; None: the engines' size, no crop
SIZE_CONDITIONING = ("original_size", "crop_top_left", "target_size")
MAX_CONDITIONING_SIDE = 16384
IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.8, 1.0  # diffusers' defaults (img2img, inpainting pipelines)
MAX_REFRESH_THRESHOLD = 100.0  # the summed relative change of the output; 0 refreshes every step


@dataclass(frozen=True)
class Request:
    """What one generation asks for. `seed` None: drawn (and reported); `height`/`width` None: the
    engines' static size (anything else is refused); `init_image`: uint8 (height, width, 3) of any
    size, resized to the engines' size, for img2img; `mask_image` with it: inpainting, uint8 (height, width),
    (height, width, 1) or RGB (height, width, 3) of any size, white where the image is repainted (resized,
    grayscale, binarized at 0.5, as diffusers' mask processor does); `original_size`, `crop_top_left`, `target_size`:
    SDXL's size conditioning (diffusers' arguments of the same names)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    guidance: float = 7.5
    seed: int | None = None
    scheduler: str = "pndm"
    cache_interval: int = 1  # DeepCache: the full U-Net every N steps (1: off)
    cache_schedule: str = "uniform"
    init_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float | None = None  # img2img, inpainting: the share of the schedule that runs; None: diffusers' default
    cache_mode: str = "on"
    height: int | None = None
    width: int | None = None
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    refresh_threshold: float | None = None  # adaptive DeepCache: None is DEFAULT_REFRESH_THRESHOLD
    loras: tuple[tuple[str, float], ...] = ()  # (registered name, scale), applied in this order
    mask_image: np.ndarray | None = field(default=None, compare=False, repr=False)  # inpainting

    def __post_init__(self):
        if self.strength is None:  # decided once, where the request is made: in process and served alike
            default = INPAINT_STRENGTH if self.mask_image is not None else IMG2IMG_STRENGTH
            object.__setattr__(self, "strength", default)

    @property
    def threshold(self) -> float:
        """The adaptive schedule's refresh threshold."""
        return DEFAULT_REFRESH_THRESHOLD if self.refresh_threshold is None else float(self.refresh_threshold)

    @property
    def img2img(self) -> bool:
        return self.init_image is not None

    @property
    def inpaint(self) -> bool:
        return self.mask_image is not None

    def replace(self, **changes) -> Request:
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, request: Request | str, **fields) -> Request:
        """`Request.of("a cat", steps=20)` or `Request.of(request, seed=3)`, as the pipeline and the client
        take it; `init_image` and `mask_image` may be a path, a PIL image or uint8 pixels."""
        if fields.get("init_image") is not None:
            from .images import read_image

            fields["init_image"] = read_image(fields["init_image"])
        if isinstance(fields.get("loras"), (list, dict)):  # [(name, scale)] or {name: scale}
            loras = fields["loras"].items() if isinstance(fields["loras"], dict) else fields["loras"]
            fields["loras"] = tuple(tuple(pair) if isinstance(pair, list) else pair for pair in loras)
        if fields.get("mask_image") is not None:
            from .images import read_mask

            fields["mask_image"] = read_mask(fields["mask_image"])
        return request.replace(**fields) if isinstance(request, Request) else cls(request, **fields)

    def description(self) -> dict:
        """What a person browsing the cache is told of the request that made an entry."""
        about = dict(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            steps=self.steps,
            guidance=self.guidance,
            scheduler=self.scheduler,
            cache_schedule=self.cache_schedule,
            cache_interval=self.cache_interval,
        )
        about |= {"loras": [list(pair) for pair in self.loras]} if self.loras else {}
        about |= {"img2img": True, "strength": self.strength} if self.img2img else {}
        return about | ({"inpaint": True} if self.inpaint else {})

    def texts(self, batch: int) -> list[str]:
        """What the text encoder reads for `batch` images: the negative prompts first, then the prompts, as
        diffusers concatenates them (the U-Net's guidance pair is unconditional, then conditional)."""
        return [self.negative_prompt] * batch + [self.prompt] * batch

    def check_size(self, height: int, width: int) -> None:
        """Engines are static at height x width: a request for another size is refused (in process and served)."""
        if (self.height or height, self.width or width) != (height, width):
            raise InvalidRequest(
                f"size {self.width or width}x{self.height or height}: these engines are static at "
                f"{width}x{height}; export and build for another size"
            )

    def check(self) -> Request:
        """Refuse a bad value before any compute, naming the field and what is allowed; returns self."""
        for name in ("prompt", "negative_prompt"):
            check_text(name, getattr(self, name))
        if not self.prompt.strip():
            raise InvalidRequest("prompt is empty: say what the image should show")
        check_int("steps", self.steps, 1, MAX_STEPS)
        check_number("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        if self.seed is not None:
            check_int("seed", self.seed, 0, MAX_SEED)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_int("cache_interval", self.cache_interval, 1, MAX_STEPS)
        check_choice("cache_schedule", self.cache_schedule, CACHE_SCHEDULES)
        if self.cache_schedule == "adaptive" and self.cache_interval != 1:
            raise InvalidRequest(
                f"cache_interval {self.cache_interval}: the adaptive schedule refreshes by refresh_threshold; "
                "leave the interval at 1, or choose uniform, nonuniform or calibrated"
            )
        if self.cache_schedule == "calibrated" and not 2 <= self.cache_interval < self.steps:
            raise InvalidRequest(
                f"cache_interval {self.cache_interval}: a calibrated schedule runs the full U-Net on fewer steps "
                f"than all {self.steps}, at N from 2 to {self.steps - 1}"
                + (" (uniform N = 1 runs every step in full)" if self.cache_interval == 1 else "")
                if self.steps > 2
                else f"steps {self.steps}: a calibrated schedule needs 3 steps or more; use uniform"
            )
        if self.refresh_threshold is not None:
            if self.cache_schedule != "adaptive":
                raise InvalidRequest("refresh_threshold: only with cache_schedule adaptive")
            check_number("refresh_threshold", self.refresh_threshold, 0.0, MAX_REFRESH_THRESHOLD)
        check_choice("cache_mode", self.cache_mode, CACHE_MODES)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 8, MAX_IMAGE_SIDE)
        for name in SIZE_CONDITIONING:
            if getattr(self, name) is not None:
                check_pair(name, getattr(self, name), 0 if name == "crop_top_left" else 1, MAX_CONDITIONING_SIDE)
        if self.img2img:
            check_number("strength", self.strength, 0.0, 1.0)
            if self.strength == 0 or denoising_steps(self.steps, self.strength) == 0:
                raise InvalidRequest(
                    f"strength {self.strength}: leaves no denoising step out of {self.steps}; raise it or the steps"
                )
            check_image("init_image", self.init_image)
        check_loras(self.loras)
        if self.inpaint:
            if not self.img2img:
                raise InvalidRequest("mask_image: inpainting repaints an init_image; give one (--init-image)")
            check_mask("mask_image", self.mask_image)
        return self

    def to_triton(self) -> dict[str, np.ndarray]:
        """The request as the ensemble's input tensors (txt2img leaves out the img2img ones, img2img the mask)."""
        from .serving.protocol import REQUEST_TENSORS

        return {
            t.tensor.name: t.encode(getattr(self, t.field))
            for t in REQUEST_TENSORS
            if (self.img2img or not t.img2img_only)
            and (self.inpaint or not t.inpaint_only)
            and not (t.optional and getattr(self, t.field) in (None, ()))
        }

    @classmethod
    def from_triton(cls, get) -> Request:
        """The inverse of `to_triton`: `get(tensor name)` gives a numpy array, or None when absent."""
        from .serving.protocol import REQUEST_TENSORS

        values = {}
        for t in REQUEST_TENSORS:
            array = get(t.tensor.name)
            if array is None:
                if t.img2img_only or t.inpaint_only or t.optional:
                    continue
                raise InvalidRequest(f"missing input {t.tensor.name}")
            values[t.field] = t.decode(array)
        return cls(**values)

    @property
    def model(self) -> str:
        """The ensemble that serves it."""
        from .serving.protocol import IMG2IMG, INPAINT, TXT2IMG

        return INPAINT if self.inpaint else IMG2IMG if self.img2img else TXT2IMG


@dataclass
class Images:
    """What one request gave back, in process or served: uint8 (batch, height, width, 3) and how it was made."""

    images: np.ndarray
    seed: int
    unet_deep_calls: int
    unet_shallow_calls: int
    steps_computed: int
    seconds: float
    cache: str = "off"  # exact | semantic | approximate | miss | off
    similarity: float = 0.0


def denoising_steps(steps: int, strength: float | None) -> int:
    """How many of `steps` a request runs: all of them, or img2img's strength share (diffusers' rule)."""
    return steps if strength is None else min(int(steps * strength), steps)


def check_text(name: str, value) -> None:
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be text, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidRequest(f"{name} is not valid UTF-8 text (binary data?)") from None
    if size > MAX_PROMPT_BYTES:
        raise InvalidRequest(
            f"{name} is {size} bytes; at most {MAX_PROMPT_BYTES} (CLIP reads the first 77 tokens anyway)"
        )
    if any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        raise InvalidRequest(f"{name} contains control characters (binary data?)")


def check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InvalidRequest(f"{name} {value!r}: must be an integer from {low} to {high}")


def check_number(name: str, value, low: float, high: float) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequest(f"{name} {value!r}: must be a number from {low:g} to {high:g}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise InvalidRequest(f"{name} {value!r}: choose one of {', '.join(choices)}")


def check_pair(name: str, value, low: int, high: int) -> None:
    """Two integers from low to high: a (height, width) or a (top, left)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InvalidRequest(f"{name} {value!r}: must be two integers, (height, width) or (top, left)")
    for v in value:
        check_int(name, v, low, high)


def check_mask(name: str, mask) -> None:
    """uint8 (height, width), (height, width, 1) or RGB (height, width, 3)."""
    shape = getattr(mask, "shape", None)
    planes = isinstance(mask, np.ndarray) and (mask.ndim == 2 or (mask.ndim == 3 and mask.shape[2] in (1, 3)))
    if not planes or mask.dtype != np.uint8:
        dtype = getattr(mask, "dtype", type(mask).__name__)
        raise InvalidRequest(
            f"{name}: must be uint8 (height, width), (height, width, 1) or (height, width, 3) pixels, "
            f"got {dtype} {shape}"
        )
    if not (1 <= mask.shape[0] <= MAX_IMAGE_SIDE and 1 <= mask.shape[1] <= MAX_IMAGE_SIDE):
        raise InvalidRequest(f"{name} is {mask.shape[1]}x{mask.shape[0]}; each side at most {MAX_IMAGE_SIDE}")


def check_image(name: str, image) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise InvalidRequest(f"{name}: must be uint8 (height, width, 3) RGB pixels, got {shape}")
    if not (1 <= image.shape[0] <= MAX_IMAGE_SIDE and 1 <= image.shape[1] <= MAX_IMAGE_SIDE):
        raise InvalidRequest(f"{name} is {image.shape[1]}x{image.shape[0]}; each side at most {MAX_IMAGE_SIDE}")
