"""The request and response of the txt2img / img2img / inpaint ensembles, and the models between them.

Like voltacache.specs for the engines: the model repository writer, the Python models, the client
and `voltacache.request.Request` read tensor names, dtypes and shapes from here.

Triton's response cache sits on the denoiser, not on the ensemble, so that a hit can be reported:
the tokenizer stamps when the request arrived (RECEIVED_NS), the denoiser when it computed its
response (COMPUTED_NS), and postprocess, which runs for every request, sees a response older than
its request and reports it as `exact` with nothing computed. A request that must not be answered
from that cache (cache off or refresh, or a seed the server draws) gets a fresh RESPONSE_KEY.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidRequest
from ..lora import lora_text, parse_lora
from ..specs import IMAGE, INPUT_IDS, TEXT_EMBEDDINGS, ComponentSpec, Geometry, TensorSpec, component_specs

# Request tensors (what a client sends).
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
ORIGINAL_SIZE = "ORIGINAL_SIZE"  # SDXL's size conditioning, int32 (2,) each; absent: the engines' size, no crop
CROP_TOP_LEFT = "CROP_TOP_LEFT"
TARGET_SIZE = "TARGET_SIZE"
LORAS = "LORAS"  # "name:scale" per LoRA registered in the deployment (deploy --lora), applied in order
# Response tensors.
IMAGES = "IMAGES"
SEED_USED = "SEED_USED"
UNET_DEEP_CALLS = "UNET_DEEP_CALLS"
UNET_SHALLOW_CALLS = "UNET_SHALLOW_CALLS"
STEPS_COMPUTED = "STEPS_COMPUTED"
CACHE_LAYER = "CACHE_LAYER"  # exact | semantic | approximate | miss | off
SIMILARITY = "SIMILARITY"
# Cache search (the cache_search model; voltacache.cache.search.SearchQuery and Found).
SEARCH = "SEARCH"  # images | prompts | newest | most-used
QUERY = "QUERY"
TOP_K = "TOP_K"
THUMBNAIL = "THUMBNAIL"  # the longest side of each image returned, in pixels; 0: as stored
RESULTS = "RESULTS"  # one JSON record per entry found, best first
RESULT_IMAGES = "RESULT_IMAGES"  # uint8 (images, height, width, 3); a record's "image" indexes it
# Sent to the denoiser directly (not through an ensemble): cancel a request in flight by its request id.
# Triton 2.51 never forwards an ensemble's cancellation to the models inside it (docs/robustness.md); the
# client names its request's id (every call carries a fresh one) and the denoiser frees its slot.
CANCEL = "CANCEL"
CANCELLED = "CANCELLED"  # int32: 1 when a request of that id was in flight (or queued), else 0
# Between the models of the ensemble.
RECEIVED_NS = "RECEIVED_NS"
COMPUTED_NS = "COMPUTED_NS"
RESPONSE_KEY = "RESPONSE_KEY"  # 0: the denoiser's response may come from Triton's cache
DENOISED = "denoised."  # prefix of the denoiser's outputs inside the ensemble, before postprocess

# Model names in the repository.
TOKENIZER = "tokenizer"
DENOISER = "denoiser"
POSTPROCESS = "postprocess"
TXT2IMG = "txt2img"
IMG2IMG = "img2img"
INPAINT = "inpaint"
CACHE_SEARCH = "cache_search"

RANDOM_SEED = -1
STEP_BATCHING = "step_batching"  # denoiser parameter: "on" runs voltacache.batching.StepBatcher
REPOSITORY_MARKER = "voltacache.json"  # written last at the root of every repository `voltacache deploy` wrote


def scalar(name: str, dtype: str) -> TensorSpec:
    return TensorSpec(name, dtype, (1,))


@dataclass(frozen=True)
class RequestTensor:
    """One field of voltacache.request.Request on the wire."""

    field: str
    tensor: TensorSpec
    img2img_only: bool = False
    inpaint_only: bool = False
    optional: bool = False  # absent: the field's default (None)

    def encode(self, value) -> np.ndarray:
        if self.field == "seed" and value is None:
            value = RANDOM_SEED
        if self.field == "loras":
            return np.array([lora_text(name, scale).encode() for name, scale in value], dtype=object)
        if self.tensor.dtype == "object":
            return np.array([value.encode("utf-8")], dtype=object)
        if self.tensor.shape == (1,):
            return np.array([value], dtype=self.tensor.dtype)
        if self.field == "mask_image" and np.ndim(value) == 2:  # a grayscale mask travels as one plane
            value = np.asarray(value)[..., None]
        return np.ascontiguousarray(value, dtype=self.tensor.dtype)

    def decode(self, array: np.ndarray):
        if self.field == "loras":  # "name:scale" each; Request.check judges them
            return tuple(parse_lora(self._text(v)) for v in np.asarray(array).reshape(-1))
        if self.tensor.shape == (2,):  # a pair: Request.check judges its length and values
            return tuple(int(v) for v in np.asarray(array).reshape(-1))
        if self.tensor.shape != (1,):
            return array
        value = array.reshape(-1)[0]
        if self.tensor.dtype == "object":
            return self._text(value)
        value = value.item()
        return None if self.field == "seed" and value == RANDOM_SEED else value

    def _text(self, value) -> str:
        raw = value if isinstance(value, bytes) else str(value).encode()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"{self.tensor.name} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


REQUEST_TENSORS = (
    RequestTensor("prompt", scalar(PROMPT, "object")),
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
    RequestTensor("original_size", TensorSpec(ORIGINAL_SIZE, "int32", (2,)), optional=True),
    RequestTensor("crop_top_left", TensorSpec(CROP_TOP_LEFT, "int32", (2,)), optional=True),
    RequestTensor("target_size", TensorSpec(TARGET_SIZE, "int32", (2,)), optional=True),
    RequestTensor("refresh_threshold", scalar(REFRESH_THRESHOLD, "float32"), optional=True),
    RequestTensor("loras", TensorSpec(LORAS, "object", (-1,)), optional=True),
)
LORA_TENSOR = next(t for t in REQUEST_TENSORS if t.field == "loras")
# in the repository, inside the denoiser's folder (Triton takes every folder at the root for a model, and
# skips one inside a model that is not a version): the registered LoRA files and voltacache.lora.REGISTRY
LORA_FOLDER = f"{DENOISER}/loras"
LORA_RESIDENT = "lora_resident"  # component parameter: LoRA variants kept loaded
SEARCH_TENSORS = (
    RequestTensor("mode", scalar(SEARCH, "object")),
    RequestTensor("text", scalar(QUERY, "object"), optional=True),
    RequestTensor("top", scalar(TOP_K, "int32"), optional=True),
    RequestTensor("thumbnail", scalar(THUMBNAIL, "int32"), optional=True),
)
SEARCH_OUTPUTS = (TensorSpec(RESULTS, "object", (-1,)), TensorSpec(RESULT_IMAGES, "uint8", (-1, -1, -1, 3)))
SEARCH_NAMES = {t.tensor.name for t in SEARCH_TENSORS} | {t.name for t in SEARCH_OUTPUTS}
CANCEL_TENSOR = RequestTensor("request_id", scalar(CANCEL, "object"))
CANCEL_INPUT, CANCEL_OUTPUT = CANCEL_TENSOR.tensor, scalar(CANCELLED, "int32")
DIRECT_NAMES = SEARCH_NAMES | {CANCEL, CANCELLED}  # the denoiser's tensors that no ensemble carries
IMG2IMG_INPUTS = {t.tensor.name for t in REQUEST_TENSORS if t.img2img_only}
INPAINT_INPUTS = {t.tensor.name for t in REQUEST_TENSORS if t.inpaint_only}
OPTIONAL_REQUEST_INPUTS = {t.tensor.name for t in REQUEST_TENSORS if t.optional}
STATS = (
    scalar(SEED_USED, "int64"),
    scalar(UNET_DEEP_CALLS, "int32"),
    scalar(UNET_SHALLOW_CALLS, "int32"),
    scalar(STEPS_COMPUTED, "int32"),
    scalar(CACHE_LAYER, "object"),
    scalar(SIMILARITY, "float32"),
)


def serving_specs(export: dict) -> dict[str, ComponentSpec]:
    """Specs of every model in the repository: the engine components, the Python models and the ensembles."""
    g = Geometry(**export["geometry"])
    engines = component_specs(g, export["batch"], export["height"], export["width"])
    ids = engines["text_encoder"].inputs
    embeddings, pooled = engines["text_encoder"].outputs
    image = engines["vae_decoder"].outputs[0]
    pixels = TensorSpec(IMAGES, "uint8", (export["batch"], export["height"], export["width"], 3))
    request = tuple(t.tensor for t in REQUEST_TENSORS)
    search = tuple(t.tensor for t in SEARCH_TENSORS)
    txt2img = tuple(t for t in request if t.name not in IMG2IMG_INPUTS)
    received, computed, key = scalar(RECEIVED_NS, "int64"), scalar(COMPUTED_NS, "int64"), scalar(RESPONSE_KEY, "int64")
    assert ids[0].name == INPUT_IDS and embeddings.name == TEXT_EMBEDDINGS and image.name == IMAGE
    return {
        **engines,
        TOKENIZER: ComponentSpec(TOKENIZER, txt2img, (*ids, received, key)),
        # the denoiser decodes itself (BLS into vae_decoder), so a cached image skips the decode; it
        # also answers cache_search's requests, as the one process that holds a milvus-lite cache
        DENOISER: ComponentSpec(
            DENOISER,
            (*request, embeddings, pooled, key, *search, CANCEL_INPUT),
            (image, *STATS, computed, *SEARCH_OUTPUTS, CANCEL_OUTPUT),
        ),
        POSTPROCESS: ComponentSpec(POSTPROCESS, (image, *STATS, computed, received), (pixels, *STATS)),
        TXT2IMG: ComponentSpec(TXT2IMG, txt2img, (pixels, *STATS)),
        IMG2IMG: ComponentSpec(IMG2IMG, tuple(t for t in request if t.name not in INPAINT_INPUTS), (pixels, *STATS)),
        INPAINT: ComponentSpec(INPAINT, request, (pixels, *STATS)),
        CACHE_SEARCH: ComponentSpec(CACHE_SEARCH, search, SEARCH_OUTPUTS),
    }


# inputs a request may leave out, per model (the ensembles pass an absent one on as absent)
OPTIONAL_INPUTS = {
    CACHE_SEARCH: {t.tensor.name for t in SEARCH_TENSORS if t.optional},
    **{name: OPTIONAL_REQUEST_INPUTS for name in (TOKENIZER, TXT2IMG, IMG2IMG, INPAINT)},
}


def optional_inputs(spec: ComponentSpec) -> set[str]:
    """The inputs of a model a request may leave out. Every one of the denoiser's: a generation
    carries none of the search tensors, a search or a cancel none of the generation's, and the
    denoiser names what is missing."""
    return set(spec.input_names) if spec.name == DENOISER else OPTIONAL_INPUTS.get(spec.name, set())
