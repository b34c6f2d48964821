"""What `voltacache export` is asked for, checked before anything heavy is imported or loaded.

Torch-free: the CLI refuses a bad option in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UsageError

# int8: the U-Nets and the VAE decoder quantized (voltacache.compile.quantize), the rest fp32; bf16: fp32 graphs
# that a backend runs on the CPU's bf16 units (OpenVINO), a precision of its own: its images are never another's
PRECISIONS = ("fp16", "fp32", "int8", "bf16")
SIZE_STEPS = (1, 2, 4, 8)  # default engine sizes, in multiples of --batch


# int8: the calibration set's default prompts (ordinary ones and the shapes model's kind)
DEFAULT_PROMPTS = (
    "a photo of an astronaut riding a horse",
    "a red circle on a blue background",
    "a watercolor painting of a lighthouse at dusk",
    "a green square on a yellow background",
    "a close-up portrait of an old man, studio lighting",
    "a blue triangle on a white background",
    "a city street at night in the rain",
    "a bowl of fruit on a wooden table",
)


@dataclass(frozen=True)
class Calibration:
    """What the int8 components were calibrated on; recorded in the manifest, part of the fingerprint."""

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    steps: int = 10
    guidance: float = 7.5
    seed: int = 0
    scheduler: str = "ddim"
    keep_fp32: tuple[str, ...] = ("conv_in", "conv_out")
    # in the id: an export whose VAE decoder is int8 makes other images than one whose decoder is fp32
    quantized: tuple[str, ...] = ("unet_deep", "unet_shallow", "vae_decoder")

    @classmethod
    def from_file(cls, path: Path | None, steps: int) -> Calibration:
        if path is None:
            return cls(steps=steps)
        try:
            lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--calibration-prompts {path}: cannot be read ({e})") from None
        if not lines:
            raise UsageError(f"--calibration-prompts {path}: no prompt in it")
        return cls(prompts=tuple(lines), steps=steps)

    def check(self) -> None:
        if not 1 <= self.steps <= 1000:
            raise UsageError(f"--calibration-steps {self.steps}: use 1 to 1000 (10 to 20 covers the schedule)")

    def to_json(self) -> dict:
        return {**asdict(self), "id": self.id}

    @property
    def id(self) -> str:
        data = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


MIN_SIDE, MAX_SIDE = 64, 4096  # image height and width, pixels
MAX_SIZES = 16  # image sizes per engine set: TensorRT builds a profile per size and batch size
DEFAULT_PROMPT_CHUNKS, MAX_PROMPT_CHUNKS = 4, 16  # 16 chunks: 1200 tokens, far beyond what CLIP was trained on


# SDXL's standard aspect-ratio buckets (its training's, as width x height), the square one first
SIZE_SETS = {
    "sdxl": ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344)),
}


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """`--sizes 512x512,768x512` (width x height, as the community writes sizes) or a named set (`sdxl`) ->
    ((height, width), ...) in the order given, the first the default; ExportOptions.check judges the numbers."""
    if text.strip().lower() in SIZE_SETS:
        return tuple((h, w) for w, h in SIZE_SETS[text.strip().lower()])
    try:
        pairs = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(pair) != 2 for pair in pairs):
        named = ", ".join(SIZE_SETS)
        raise UsageError(
            f"--sizes {text!r}: give WIDTHxHEIGHT sizes separated by commas, e.g. 512x512,768x512, "
            f"or a named set ({named})"
        )
    return tuple((h, w) for w, h in pairs)


def is_deepcache_branch(name) -> bool:
    """`block` (the input of up_blocks[-1]) or a DeepCache branch number (compile.unet_split)."""
    return name == "block" or (isinstance(name, str) and name.isdigit())


@dataclass
class ExportOptions:
    precision: str = "fp16"
    batch: int = 1
    height: int | None = None  # default: the model's native size
    width: int | None = None
    opset: int = 23
    deepcache_branch: str = "block"
    seed: int = 0
    calibration: Calibration | None = None  # int8: what the U-Nets are calibrated on (default: Calibration())
    # images per engine call the engines are built for (sorted, unique); default batch x SIZE_STEPS
    batch_sizes: tuple[int, ...] | None = None
    # prompts of up to this many chunks of 75 tokens (voltacache.runtime.tokenizer): the U-Nets' context is dynamic
    max_prompt_chunks: int = DEFAULT_PROMPT_CHUNKS
    # several (height, width) image sizes served by one engine set, the first the default (export --sizes);
    # () for one: height x width
    sizes: tuple[tuple[int, int], ...] = ()
    # (name, path) of each ControlNet exported beside the model (export --controlnet NAME=PATH): a component
    # controlnet_NAME each, and U-Nets that take their residuals
    controlnets: tuple[tuple[str, Path], ...] = ()

    def __post_init__(self):
        self.sizes = tuple(dict.fromkeys(tuple(size) for size in self.sizes))  # once each, in the order given
        if self.sizes:
            self.height, self.width = self.sizes[0]
        if self.precision == "int8" and self.calibration is None:
            self.calibration = Calibration()
        if self.batch_sizes is None:
            self.batch_sizes = tuple(self.batch * k for k in SIZE_STEPS)
        self.batch_sizes = tuple(sorted(set(self.batch_sizes)))

    def check(self):
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: use {', '.join(PRECISIONS)}")
        if self.opset not in (18, 23):
            raise UsageError(f"--opset {self.opset}: use 23 (fused Attention) or 18 (unfused, TensorRT < 10.14)")
        for name in ("height", "width"):
            value = getattr(self, name)
            # the U-Net halves the latent (pixels / 8) three times: below 64 nothing is left; above 4096 the
            # export alone would not fit this class of machine
            if value is not None and not (MIN_SIDE <= value <= MAX_SIDE and value % 64 == 0) and not self.sizes:
                raise UsageError(f"--{name} {value}: a multiple of 64 pixels from {MIN_SIDE} to {MAX_SIDE}, e.g. 512")
        for height, width in self.sizes:
            if not all(MIN_SIDE <= v <= MAX_SIDE and v % 64 == 0 for v in (height, width)):
                raise UsageError(
                    f"--sizes {width}x{height}: width and height multiples of 64 pixels from {MIN_SIDE} to "
                    f"{MAX_SIDE}, e.g. 512x512,768x512"
                )
        if len(self.sizes) > MAX_SIZES:
            raise UsageError(f"--sizes: {len(self.sizes)} sizes; one engine set serves up to {MAX_SIZES}")
        if not is_deepcache_branch(self.deepcache_branch):
            raise UsageError(
                f"--deepcache-branch {self.deepcache_branch!r}: use block, or a DeepCache branch number such as 0"
            )
        if not 1 <= self.max_prompt_chunks <= MAX_PROMPT_CHUNKS:
            raise UsageError(
                f"--max-prompt-chunks {self.max_prompt_chunks}: use 1 to {MAX_PROMPT_CHUNKS} chunks of 75 tokens "
                f"(default {DEFAULT_PROMPT_CHUNKS})"
            )
        if self.batch < 1:
            raise UsageError(f"--batch {self.batch}: use 1 or more images per request")
        if not self.batch_sizes or any(n < 1 or n % self.batch for n in self.batch_sizes):
            sizes = ",".join(map(str, self.batch_sizes))
            raise UsageError(f"--batch-sizes {sizes}: use positive multiples of --batch {self.batch}, e.g. 1,2,4,8")
        names = [name for name, _ in self.controlnets]
        if len(set(names)) != len(names):
            raise UsageError(
                f"--controlnet: {', '.join(names)} names one ControlNet twice; give each a name of its own"
            )
        if self.controlnets and len(self.sizes) > 1:
            raise UsageError("--controlnet with --sizes: ControlNet engines serve one image size so far; drop --sizes")
        if self.precision == "int8":
            self.calibration.check()
        elif self.calibration is not None:
            raise UsageError("--calibration-prompts / --calibration-steps: only with --precision int8")

    @property
    def graph_precision(self) -> str:
        """The precision the graphs are exported in, before any quantization (bf16: the backend's units)."""
        return "fp32" if self.precision in ("int8", "bf16") else self.precision

    def fingerprint(self, model: str) -> str:
        """What the images depend on: the weights, and how they were compiled (a cache entry of one
        export is never served for another)."""
        # Shapes are not in it (nor batch_sizes): a row's result does not depend on how many rows share its call.
        calibration = self.calibration.id if self.calibration else ""
        text = f"{model}|{self.precision}|{calibration}|{self.opset}|{self.deepcache_branch}"
        return hashlib.sha256(text.encode()).hexdigest()


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """`--batch-sizes 1,2,4,8` -> (1, 2, 4, 8); ExportOptions.check judges the numbers."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r}: give image counts separated by commas, e.g. 1,2,4,8") from None
