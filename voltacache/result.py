"""What one request gave back, the same everywhere: the in-process pipeline and the served denoiser make a
`Result`, the client reads one, `generate --json` prints one. Its wire codec (`to_triton`/`from_triton`)
is built from its tensor table, which the model repository's configs read too. Images stay uint8 from
the denoiser's decode to the client.

Torch-free, like voltacache.request.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .specs import TensorSpec

IMAGES = "IMAGES"  # uint8 (batch, height, width, 3)
SEED_USED = "SEED_USED"
UNET_DEEP_CALLS = "UNET_DEEP_CALLS"
UNET_SHALLOW_CALLS = "UNET_SHALLOW_CALLS"
CONTROLNET_CALLS = "CONTROLNET_CALLS"
STEPS_COMPUTED = "STEPS_COMPUTED"
CACHE_LAYER = "CACHE_LAYER"  # exact | semantic | approximate | miss | off
SIMILARITY = "SIMILARITY"
CACHE_LAYERS = ("exact", "semantic", "approximate", "miss", "off")


@dataclass(frozen=True)
class ResultTensor:
    field: str
    tensor: TensorSpec


# the fields on the wire, but the images (whose shape is the deployment's) and the client's own `seconds`
STATS = (
    ResultTensor("seed", TensorSpec(SEED_USED, "int64", (1,))),
    ResultTensor("unet_deep_calls", TensorSpec(UNET_DEEP_CALLS, "int32", (1,))),
    ResultTensor("unet_shallow_calls", TensorSpec(UNET_SHALLOW_CALLS, "int32", (1,))),
    ResultTensor("controlnet_calls", TensorSpec(CONTROLNET_CALLS, "int32", (1,))),
    ResultTensor("steps_computed", TensorSpec(STEPS_COMPUTED, "int32", (1,))),
    ResultTensor("cache", TensorSpec(CACHE_LAYER, "object", (1,))),
    ResultTensor("similarity", TensorSpec(SIMILARITY, "float32", (1,))),
)
STAT_TENSORS = tuple(t.tensor for t in STATS)


def images_tensor(batch: int, height: int, width: int) -> TensorSpec:
    return TensorSpec(IMAGES, "uint8", (batch, height, width, 3))


@dataclass
class Result:
    """uint8 images (batch, height, width, 3) and how they were made."""

    images: np.ndarray
    seed: int
    unet_deep_calls: int = 0
    unet_shallow_calls: int = 0
    controlnet_calls: int = 0  # one per ControlNet per step it ran on
    steps_computed: int = 0
    seconds: float = 0.0  # from the request's arrival (served: as the client waited) to its answer
    cache: str = "off"  # CACHE_LAYERS
    similarity: float = 0.0

    def exact_hit(self) -> Result:
        """This result as an exact repeat is told: Triton's response cache answered, nothing computed."""
        return dataclasses.replace(
            self,
            unet_deep_calls=0,
            unet_shallow_calls=0,
            controlnet_calls=0,
            steps_computed=0,
            cache="exact",
            similarity=1.0,
        )

    def record(self) -> dict:
        """The fields a person reads (`generate --json`), without the pixels."""
        return {
            "seed": self.seed,
            "unet_deep_calls": self.unet_deep_calls,
            "unet_shallow_calls": self.unet_shallow_calls,
            "controlnet_calls": self.controlnet_calls,
            "steps_computed": self.steps_computed,
            "seconds": round(self.seconds, 4),
            "cache": self.cache,
            "similarity": round(self.similarity, 4),
        }

    def to_triton(self) -> dict[str, np.ndarray]:
        out = {IMAGES: np.ascontiguousarray(self.images, np.uint8)}
        for t in STATS:
            value = getattr(self, t.field)
            out[t.tensor.name] = (
                np.array([str(value).encode()], dtype=object)
                if t.tensor.dtype == "object"
                else np.array([value], t.tensor.dtype)
            )
        return out

    @classmethod
    def from_triton(cls, get, seconds: float = 0.0) -> Result:
        """`get(tensor name)` gives each output as a numpy array."""
        values = {}
        for t in STATS:
            value = np.asarray(get(t.tensor.name)).reshape(-1)[0]
            values[t.field] = value.decode() if isinstance(value, bytes) else value.item()
        return cls(images=get(IMAGES), seconds=seconds, **values)
