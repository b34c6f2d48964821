"""One generation request, the same everywhere: the CLI, the in-process pipeline, the Triton client
and the Triton models all carry a `Request`. Its defaults are written here once (a served request may
leave out every field but the prompt: the server applies these), `check()` runs once per process
where a request enters it, and `to_triton()` / `from_triton()` are its wire codec, built from the
tensor table below (`REQUEST_TENSORS`), which the model repository's configs read too.

What a request may name is its vocabulary, also here: schedulers (voltacache.schedulers), DeepCache
schedules, cache modes, LoRAs (`LoraRequest`: a registered name and a scale). Which fields change the
image is declared on the fields (`scope` metadata): the cross-request cache scopes an entry by them,
and `description()` tells a person browsing the cache about them, so a new field is scoped by default.

Torch-free on purpose: `generate --url` and the tokenizer/postprocess models import it without
torch or diffusers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import KW_ONLY, dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import InvalidRequest
from .prompts import WeightedPrompt, check_weighting, parse
from .schedulers import SCHEDULERS
from .specs import TensorSpec

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
# DeepCache: which steps run the full U-Net (voltacache.pipeline.deepcache)
CACHE_SCHEDULES = ("uniform", "nonuniform", "calibrated", "adaptive")
DEFAULT_REFRESH_THRESHOLD = 0.2  # adaptive: chosen on the shapes model (docs/benchmarks.md)
MAX_REFRESH_THRESHOLD = 100.0  # the summed relative change of the output; 0 refreshes every step
# LoRAs a request names: registered in the deployment (deploy --lora), or files in process (generate --lora)
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_LORAS = 8  # per request
MAX_LORA_SCALE = 10.0  # |scale|; useful values are 0-1.5 (a ControlNet's too)
# ControlNet on DeepCache's shallow steps: the last full step's residuals, or the ControlNets run again; the
# default is what placement adherence on the shapes ControlNet supports (docs/benchmarks.md)
RESIDUAL_MODES = ("reuse", "fresh")
DEFAULT_CONTROL_RESIDUALS = "reuse"


class LoraRequest(NamedTuple):
    """One LoRA of a request: a name the engines know, and its scale (`fuse_lora(lora_scale=...)`). A
    tuple, so `("style", 0.8)` is one too; "style:0.8" on the wire and the command line."""

    name: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraRequest:
        """`NAME_OR_FILE[:SCALE]`; the scale defaults to 1 (a file name may hold ':'). Not checked here."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(head, float(tail))
            except ValueError:
                pass
        return cls(text, 1.0)

    def __str__(self) -> str:
        return f"{self.name}:{float(self.scale)!r}"  # repr: the float comes back exactly


class ControlNetRequest(LoraRequest):
    """One ControlNet of a request: a name the engines have (export --controlnet NAME=...) and its conditioning
    scale (diffusers' controlnet_conditioning_scale); "canny:0.8" on the wire and the command line."""


def scoped(kind: str = "value", when: str | None = None, **kwargs):
    """A field that changes the image: the cache scopes its entries by it (`kind`: how the pipeline reads
    it; `when`: a Request property that says whether it applies)."""
    return field(metadata={"scope": kind, "when": when}, **kwargs)


def unscoped(**kwargs):
    """A field that does not change the image (or is the cache key itself: the prompt's embedding, the seed)."""
    return field(metadata={"scope": None}, **kwargs)


@dataclass(frozen=True)
class Request:
    """What one generation asks for; every field but the prompt is keyword-only and has its default here.

    Images: `init_image` uint8 (height, width, 3) of any size, resized to the engines' size (img2img);
    `mask_image` with it, uint8 (height, width), (height, width, 1) or RGB (height, width, 3), white where
    the image is repainted (inpainting: resized, grayscale, binarized at 0.5, as diffusers' mask processor).
    `seed` None: drawn and reported. `height`/`width` None: the engines' default size (one they were not
    exported for is refused).
    """

    prompt: str = unscoped()  # the cache looks it up by its embedding
    _: KW_ONLY
    negative_prompt: str = ""
    # denoising
    steps: int = 50
    guidance: float = 7.5
    seed: int | None = unscoped(default=None)  # the cache picks a seed of its own entries when none is given
    scheduler: str = "pndm"
    # DeepCache: the full U-Net every `cache_interval` steps (1: off), where `cache_schedule` places them
    cache_interval: int = 1
    cache_schedule: str = "uniform"
    refresh_threshold: float | None = scoped("threshold", default=None, when="adaptive")  # None: the default
    # image input: img2img, and inpainting with a mask
    init_image: np.ndarray | None = scoped("image", default=None, compare=False, repr=False)
    strength: float | None = scoped(default=None, when="img2img")  # None: diffusers' default for the kind
    mask_image: np.ndarray | None = scoped("mask", default=None, compare=False, repr=False)
    # size: one the engines serve (export --sizes; None: their default), and SDXL's size conditioning
    # (diffusers' arguments of these names)
    height: int | None = scoped("size", default=None)
    width: int | None = scoped("size", default=None)
    original_size: tuple[int, int] | None = scoped("size_conditioning", default=None)
    crop_top_left: tuple[int, int] | None = scoped("size_conditioning", default=None)
    target_size: tuple[int, int] | None = scoped("size_conditioning", default=None)
    # LoRAs, applied in this order: each by its file's content and scale
    loras: tuple[LoraRequest, ...] = scoped("loras", default=())
    # ControlNets, their residuals summed (diffusers' MultiControlNetModel), each with its control image (one image
    # serves them all), uint8 (height, width, 3) of any size, resized to the image's; active over the steps from
    # control_start to control_end (diffusers' control_guidance_start/end); on DeepCache's shallow steps the
    # residuals of the last full step are reused, or with control_residuals "fresh" the ControlNets run again
    controlnets: tuple[ControlNetRequest, ...] = scoped("controlnets", default=())
    control_images: tuple[np.ndarray, ...] = scoped("control_images", default=(), compare=False, repr=False)
    control_start: float = scoped(default=0.0, when="controlled")
    control_end: float = scoped(default=1.0, when="controlled")
    control_residuals: str = scoped(default=DEFAULT_CONTROL_RESIDUALS, when="controlled")
    # the cross-request cache for this request
    cache_mode: str = unscoped(default="on")

    def __post_init__(self):
        if self.strength is None:  # decided once, where the request is made: in process and served alike
            default = INPAINT_STRENGTH if self.mask_image is not None else IMG2IMG_STRENGTH
            object.__setattr__(self, "strength", default)
        for name, kind in (("loras", LoraRequest), ("controlnets", ControlNetRequest)):
            value = getattr(self, name)
            if isinstance(value, (tuple, list)):  # ("name", scale) pairs as the field's type; check() judges the rest
                pairs = (kind(*p) if isinstance(p, (tuple, list)) and len(p) == 2 else p for p in value)
                object.__setattr__(self, name, tuple(pairs))
        if isinstance(self.control_images, np.ndarray):  # one image for every ControlNet
            object.__setattr__(self, "control_images", (self.control_images,))

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

    @property
    def controlled(self) -> bool:
        return bool(self.controlnets)

    def control_image(self, i: int) -> np.ndarray:
        """The control image of the request's i-th ControlNet."""
        return self.control_images[i if len(self.control_images) > 1 else 0]

    @property
    def adaptive(self) -> bool:
        return self.cache_schedule == "adaptive"

    def replace(self, **changes) -> Request:
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, request: Request | str, **fields) -> Request:
        """`Request.of("a cat", steps=20)` or `Request.of(request, seed=3)`, as the pipeline and the client
        take it; `init_image` and `mask_image` may be a path, a PIL image or uint8 pixels; `loras` pairs, or
        {name: scale}."""
        if fields.get("init_image") is not None:
            from .images import read_image

            fields["init_image"] = read_image(fields["init_image"])
        for name in ("loras", "controlnets"):
            if isinstance(fields.get(name), dict):
                fields[name] = tuple(fields[name].items())
        images = fields.get("control_images")
        if images is not None and not isinstance(images, (tuple, list)):
            images = (images,)
        if images:
            from .images import read_image

            fields["control_images"] = tuple(read_image(image, "control_image") for image in images)
        if fields.get("mask_image") is not None:
            from .images import read_mask

            fields["mask_image"] = read_mask(fields["mask_image"])
        return request.replace(**fields) if isinstance(request, Request) else cls(request, **fields)

    def scoped_fields(self) -> dict[str, tuple[str, object]]:
        """{field: (kind, value)} of the fields that change the image and apply to this request (the cache
        scope's source: voltacache.pipeline.stable_diffusion reads each kind)."""
        found = {}
        for f in dataclasses.fields(self):
            kind = f.metadata.get("scope", "value")
            if kind is None or (f.metadata.get("when") and not getattr(self, f.metadata["when"])):
                continue
            found[f.name] = (kind, getattr(self, f.name))
        return found

    def description(self) -> dict:
        """What a person browsing the cache is told of the request that made an entry: the prompt and what
        else changed the image (images and sizes are told by what they are, not their pixels)."""
        about = {"prompt": self.prompt}
        for name, (kind, value) in self.scoped_fields().items():
            if kind in ("loras", "controlnets"):
                about |= {name: [list(pair) for pair in value]} if value else {}
            elif kind == "control_images":
                about |= {"control_images": len(value)} if value else {}
            elif kind == "image":
                about |= {"img2img": True} if value is not None else {}
            elif kind == "mask":
                about |= {"inpaint": True} if value is not None else {}
            elif value is not None:
                about[name] = list(value) if isinstance(value, tuple) else value
        return about

    def texts(self, batch: int) -> list[str]:
        """What the text encoder reads for `batch` images: the negative prompts first, then the prompts, as
        diffusers concatenates them (the U-Net's guidance pair is unconditional, then conditional); each with
        its weighting syntax read out (`weighted` keeps the weights)."""
        return [prompt.text for prompt in self.weighted(batch)]

    def weighted(self, batch: int) -> list[WeightedPrompt]:
        """`texts`, each with the (text, weight) fragments its weighting syntax gives (voltacache.prompts)."""
        return [parse(self.negative_prompt, "negative_prompt")] * batch + [parse(self.prompt)] * batch

    def size(self, default: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) the request asks for, a side it leaves out the default's."""
        return self.height or default[0], self.width or default[1]

    def check_size(self, sizes: tuple[tuple[int, int], ...]) -> None:
        """The engines serve the (height, width) `sizes`, the default first: another is refused (in process and
        served), naming them."""
        height, width = self.size(sizes[0])
        if (height, width) not in sizes:
            if len(sizes) == 1:
                served, remedy = f"are static at {sizes[0][1]}x{sizes[0][0]}", "export with --sizes to serve several"
            else:
                served, remedy = f"serve {', '.join(f'{w}x{h}' for h, w in sizes)}", "export with --sizes to add it"
            raise InvalidRequest(f"size {width}x{height}: these engines {served}; {remedy}")

    def check(self) -> Request:
        """Refuse a bad value before any compute, naming the field and what is allowed; returns self."""
        for name in ("prompt", "negative_prompt"):
            check_text(name, getattr(self, name))
            check_weighting(getattr(self, name), name)
        if not self.prompt.strip():
            raise InvalidRequest("prompt is empty: say what the image should show")
        check_int("steps", self.steps, 1, MAX_STEPS)
        check_number("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        if self.seed is not None:
            check_int("seed", self.seed, 0, MAX_SEED)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_int("cache_interval", self.cache_interval, 1, MAX_STEPS)
        check_choice("cache_schedule", self.cache_schedule, CACHE_SCHEDULES)
        if self.adaptive and self.cache_interval != 1:
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
            if not self.adaptive:
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
        check_loras(self.controlnets, "controlnets")
        self.check_control()
        if self.inpaint:
            if not self.img2img:
                raise InvalidRequest("mask_image: inpainting repaints an init_image; give one (--init-image)")
            check_mask("mask_image", self.mask_image)
        return self

    def check_control(self) -> None:
        """The ControlNet fields: a control image for the ControlNets (one, or one each), a range within the steps."""
        if not self.controlled:
            if self.control_images:
                raise InvalidRequest("control_image: name the ControlNet it steers (controlnets, --controlnet NAME)")
            return
        if len(self.control_images) not in (1, len(self.controlnets)):
            raise InvalidRequest(
                f"control_image: {len(self.control_images)} given for {len(self.controlnets)} ControlNets; give one "
                "for all, or one each in the order of the ControlNets"
            )
        for image in self.control_images:
            check_image("control_image", image)
        check_number("control_start", self.control_start, 0.0, 1.0)
        check_number("control_end", self.control_end, 0.0, 1.0)
        if self.control_start >= self.control_end:
            raise InvalidRequest(
                f"control_start {self.control_start} / control_end {self.control_end}: the ControlNets act from "
                "start to end, fractions of the steps with start < end (default 0 to 1)"
            )
        check_choice("control_residuals", self.control_residuals, RESIDUAL_MODES)

    def to_triton(self) -> dict[str, np.ndarray]:
        """The request as the ensembles' input tensors: what is set (None and () are left out, the server
        applies the defaults); txt2img leaves out the image inputs, img2img the mask."""
        return {
            t.tensor.name: t.encode(getattr(self, t.field))
            for t in REQUEST_TENSORS
            if (self.img2img or not t.img2img_only)
            and (self.inpaint or not t.inpaint_only)
            and (t.when is None or getattr(self, t.when))
            and (t.field == "seed" or not unset(getattr(self, t.field)))  # None is a seed: drawn by the server
        }

    @classmethod
    def from_triton(cls, get) -> Request:
        """The inverse of `to_triton`: `get(tensor name)` gives a numpy array, or None when absent; every
        field but the prompt may be absent (its default here)."""
        return cls(**decode_tensors(REQUEST_TENSORS, get))


# The request's tensors (what a client sends), one per field.
PROMPT = "PROMPT"
NEGATIVE_PROMPT = "NEGATIVE_PROMPT"
STEPS = "STEPS"
GUIDANCE = "GUIDANCE"
SEED = "SEED"  # -1: the server draws one (and reports it)
SCHEDULER = "SCHEDULER"
CACHE_INTERVAL = "CACHE_INTERVAL"
CACHE_SCHEDULE = "CACHE_SCHEDULE"
REFRESH_THRESHOLD = "REFRESH_THRESHOLD"  # adaptive DeepCache; absent: the default
CACHE = "CACHE"  # on | off | refresh: the cross-request cache for this request
INIT_IMAGE = "INIT_IMAGE"  # uint8 (height, width, 3), any size: resized to the engines' size
STRENGTH = "STRENGTH"
MASK_IMAGE = "MASK_IMAGE"  # inpainting: uint8 (height, width, 1 or 3), any size; white is repainted
HEIGHT = "HEIGHT"  # int32 (1,): one of the sizes the engines serve (export --sizes); absent: their default
WIDTH = "WIDTH"
ORIGINAL_SIZE = "ORIGINAL_SIZE"  # SDXL's size conditioning, int32 (2,) each; absent: the engines' size, no crop
CROP_TOP_LEFT = "CROP_TOP_LEFT"
TARGET_SIZE = "TARGET_SIZE"
LORAS = "LORAS"  # "name:scale" per LoRA registered in the deployment (deploy --lora), applied in order
CONTROLNETS = "CONTROLNETS"  # "name:scale" per ControlNet the engines have (export --controlnet)
CONTROL_IMAGE = "CONTROL_IMAGE"  # uint8 (images, height, width, 3): one for every ControlNet, or one each
CONTROL_START = "CONTROL_START"
CONTROL_END = "CONTROL_END"
CONTROL_RESIDUALS = "CONTROL_RESIDUALS"  # reuse | fresh: DeepCache's shallow steps
RANDOM_SEED = -1


def scalar(name: str, dtype: str) -> TensorSpec:
    return TensorSpec(name, dtype, (1,))


@dataclass(frozen=True)
class RequestTensor:
    """One field of `Request` on the wire."""

    field: str
    tensor: TensorSpec
    img2img_only: bool = False  # carried by the img2img and inpaint ensembles only (required there)
    inpaint_only: bool = False
    optional: bool = True  # absent: the field's default
    when: str | None = None  # a Request property: sent only where it holds (ControlNet's fields with ControlNets)

    def encode(self, value) -> np.ndarray:
        if self.field == "seed" and value is None:
            value = RANDOM_SEED
        if self.field in ("loras", "controlnets"):
            return np.array([str(LoraRequest(*pair)).encode() for pair in value], dtype=object)
        if self.field == "control_images":  # stacked: the client sends them at one size
            if len({image.shape for image in value}) > 1:
                raise InvalidRequest("control_image: give the control images at one size (they are resized anyway)")
            return np.ascontiguousarray(np.stack(value), dtype=self.tensor.dtype)
        if self.tensor.dtype == "object":
            return np.array([value.encode("utf-8")], dtype=object)
        if self.tensor.shape == (1,):
            return np.array([value], dtype=self.tensor.dtype)
        if self.field == "mask_image" and np.ndim(value) == 2:  # a grayscale mask travels as one plane
            value = np.asarray(value)[..., None]
        return np.ascontiguousarray(value, dtype=self.tensor.dtype)

    def decode(self, array: np.ndarray):
        if self.field in ("loras", "controlnets"):  # "name:scale" each; Request.check judges them
            kind = LoraRequest if self.field == "loras" else ControlNetRequest
            return tuple(kind.parse(self.text(v)) for v in np.asarray(array).reshape(-1))
        if self.field == "control_images":  # one per ControlNet; Request.check judges each
            return tuple(np.asarray(array)) if np.ndim(array) == 4 else (array,)
        if self.tensor.shape == (2,):  # a pair: Request.check judges its length and values
            return tuple(int(v) for v in np.asarray(array).reshape(-1))
        if self.tensor.shape != (1,):
            return array
        value = array.reshape(-1)[0]
        if self.tensor.dtype == "object":
            return self.text(value)
        if self.tensor.dtype == "float32":  # the shortest decimal of the float32: the number the client wrote (0.7,
            return float(str(np.float32(value)))  # not 0.699999988, which would run one img2img step fewer)
        value = value.item()
        return None if self.field == "seed" and value == RANDOM_SEED else value

    def text(self, value) -> str:
        raw = value if isinstance(value, bytes) else str(value).encode()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"{self.tensor.name} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def unset(value) -> bool:
    """None, or no LoRAs: left out on the wire (the server applies the default)."""
    return value is None or (isinstance(value, tuple) and not value)


def decode_tensors(table, get) -> dict:
    """{field: value} of the tensors `get(name)` returns (None: absent, the field's default); a tensor that
    is not optional must be there."""
    values = {}
    for t in table:
        array = get(t.tensor.name)
        if array is None:
            if not t.optional:
                raise InvalidRequest(f"missing input {t.tensor.name}")
            continue
        values[t.field] = t.decode(array)
    return values


REQUEST_TENSORS = (
    RequestTensor("prompt", scalar(PROMPT, "object"), optional=False),
    RequestTensor("negative_prompt", scalar(NEGATIVE_PROMPT, "object")),
    RequestTensor("steps", scalar(STEPS, "int32")),
    RequestTensor("guidance", scalar(GUIDANCE, "float32")),
    RequestTensor("seed", scalar(SEED, "int64")),
    RequestTensor("scheduler", scalar(SCHEDULER, "object")),
    RequestTensor("cache_interval", scalar(CACHE_INTERVAL, "int32")),
    RequestTensor("cache_schedule", scalar(CACHE_SCHEDULE, "object")),
    RequestTensor("cache_mode", scalar(CACHE, "object")),
    RequestTensor("init_image", TensorSpec(INIT_IMAGE, "uint8", (-1, -1, 3)), img2img_only=True),
    RequestTensor("strength", scalar(STRENGTH, "float32"), img2img_only=True),
    RequestTensor("mask_image", TensorSpec(MASK_IMAGE, "uint8", (-1, -1, -1)), img2img_only=True, inpaint_only=True),
    RequestTensor("height", scalar(HEIGHT, "int32")),
    RequestTensor("width", scalar(WIDTH, "int32")),
    RequestTensor("original_size", TensorSpec(ORIGINAL_SIZE, "int32", (2,))),
    RequestTensor("crop_top_left", TensorSpec(CROP_TOP_LEFT, "int32", (2,))),
    RequestTensor("target_size", TensorSpec(TARGET_SIZE, "int32", (2,))),
    RequestTensor("refresh_threshold", scalar(REFRESH_THRESHOLD, "float32")),
    RequestTensor("loras", TensorSpec(LORAS, "object", (-1,))),
    RequestTensor("controlnets", TensorSpec(CONTROLNETS, "object", (-1,))),
    RequestTensor("control_images", TensorSpec(CONTROL_IMAGE, "uint8", (-1, -1, -1, 3))),
    RequestTensor("control_start", scalar(CONTROL_START, "float32"), when="controlled"),
    RequestTensor("control_end", scalar(CONTROL_END, "float32"), when="controlled"),
    RequestTensor("control_residuals", scalar(CONTROL_RESIDUALS, "object"), when="controlled"),
)
LORA_TENSOR = next(t for t in REQUEST_TENSORS if t.field == "loras")
IMAGE_INPUTS = {t.tensor.name for t in REQUEST_TENSORS if t.img2img_only}  # required by img2img and inpaint
MASK_INPUTS = {t.tensor.name for t in REQUEST_TENSORS if t.inpaint_only}  # required by inpaint
OPTIONAL_INPUTS = {t.tensor.name for t in REQUEST_TENSORS if t.optional}  # only PROMPT is required


def check_loras(loras, field: str = "loras") -> None:
    """A request's LoRAs (or ControlNets): at most MAX_LORAS (name, scale) pairs, each name name-shaped, once."""
    one = field[:-1].replace("controlnet", "ControlNet").replace("lora", "LoRA")
    if not isinstance(loras, tuple) or len(loras) > MAX_LORAS:
        raise InvalidRequest(f"{field}: at most {MAX_LORAS} (name, scale) pairs, got {loras!r}")
    for pair in loras:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise InvalidRequest(f"{field}: each must be (name, scale), got {pair!r}")
        if not LORA_NAME.fullmatch(pair[0]):
            raise InvalidRequest(f"{field[:-1]} {pair[0]!r}: a name is letters, digits, '_', '.' or '-' (at most 64)")
        check_number(f"{field[:-1]} {pair[0]} scale", pair[1], -MAX_LORA_SCALE, MAX_LORA_SCALE)
    names = [name for name, _ in loras]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"{field}: {names} names one {one} twice; give each once, with its scale")


def denoising_steps(steps: int, strength: float | None) -> int:
    """How many of `steps` a request runs: all of them, or img2img's strength share (diffusers' rule)."""
    return steps if strength is None else min(int(steps * strength), steps)


def check_text(name: str, value) -> None:
    """UTF-8 text of at most MAX_PROMPT_BYTES, no control characters."""
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
