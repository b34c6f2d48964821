"""The request and response of the txt2img / img2img / inpaint ensembles, and the models between them.

Like voltacache.specs for the engines: the model repository writer, the Python models and the client
read every model's tensors from here. The request's tensors are `voltacache.request.REQUEST_TENSORS`
(only PROMPT is required: a bare KServe v2 request gets the `Request` defaults), the result's
`voltacache.result.STATS`, the cache search's `voltacache.cache.search.SEARCH_TENSORS`; this module
composes them into the ensembles and adds what passes between their models.

Triton's response cache sits on the denoiser, not on the ensemble, so that a hit can be reported:
the tokenizer stamps when the request arrived (RECEIVED_NS), the denoiser when it computed its
response (COMPUTED_NS), and postprocess, which runs for every request, sees a response older than
its request and reports it as `exact` with nothing computed. A request that must not be answered
from that cache (cache off or refresh, or a seed the server draws) gets a fresh RESPONSE_KEY.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

# The wire's tensor names, for whoever speaks it (the client, the models, the tests): each defined with its
# type's codec, in voltacache.request, voltacache.result and voltacache.cache.search.
from ..cache.search import (  # noqa: F401
    QUERY,
    RESULT_IMAGES,
    RESULTS,
    SEARCH,
    SEARCH_OUTPUTS,
    SEARCH_TENSORS,
    THUMBNAIL,
    TOP_K,
)
from ..request import (  # noqa: F401
    CACHE,
    CACHE_INTERVAL,
    CACHE_SCHEDULE,
    CONTROL_END,
    CONTROL_IMAGE,
    CONTROL_RESIDUALS,
    CONTROL_START,
    CONTROLNETS,
    CROP_TOP_LEFT,
    GUIDANCE,
    HEIGHT,
    IMAGE_INPUTS,
    INIT_IMAGE,
    LORA_TENSOR,
    LORAS,
    MASK_IMAGE,
    MASK_INPUTS,
    NEGATIVE_PROMPT,
    OPTIONAL_INPUTS,
    ORIGINAL_SIZE,
    PROMPT,
    RANDOM_SEED,
    REFRESH_THRESHOLD,
    REQUEST_TENSORS,
    SCHEDULER,
    SEED,
    STEPS,
    STRENGTH,
    TARGET_SIZE,
    WIDTH,
    LoraRequest,
    Request,
    scalar,
)
from ..result import (  # noqa: F401
    CACHE_LAYER,
    CONTROLNET_CALLS,
    IMAGES,
    SEED_USED,
    SIMILARITY,
    STAT_TENSORS,
    STEPS_COMPUTED,
    UNET_DEEP_CALLS,
    UNET_SHALLOW_CALLS,
    images_tensor,
)
from ..specs import (
    INPUT_IDS,
    PROMPT_AXIS,
    SPATIAL,
    TEXT_EMBEDDINGS,
    ComponentSpec,
    TensorSpec,
    component_specs,
)

# Sent to the denoiser directly (not through an ensemble): cancel a request in flight by its request id.
# Triton 2.51 never forwards an ensemble's cancellation to the models inside it (docs/robustness.md); the
# client names its request's id (every call carries a fresh one) and the denoiser frees its slot.
CANCEL = "CANCEL"
CANCELLED = "CANCELLED"  # int32: 1 when a request of that id was in flight (or queued), else 0
CANCEL_INPUT, CANCEL_OUTPUT = scalar(CANCEL, "object"), scalar(CANCELLED, "int32")
# Between the models of the ensemble.
RECEIVED_NS = "RECEIVED_NS"
COMPUTED_NS = "COMPUTED_NS"
RESPONSE_KEY = "RESPONSE_KEY"  # 0: the denoiser's response may come from Triton's cache
LORA_ROWS = "LORA_ROWS"  # the tokenizer's LORAS, one "name:scale,..." text per text-encoder row ("" for none)
DENOISED = "denoised."  # prefix of the denoiser's outputs inside the ensemble, before postprocess

# Model names in the repository.
TOKENIZER = "tokenizer"
DENOISER = "denoiser"
POSTPROCESS = "postprocess"
TXT2IMG = "txt2img"
IMG2IMG = "img2img"
INPAINT = "inpaint"
CACHE_SEARCH = "cache_search"

STEP_BATCHING = "step_batching"  # denoiser parameter: "on" runs voltacache.pipeline.batching.StepBatcher
REPOSITORY_MARKER = "voltacache.json"  # written last at the root of every repository `voltacache deploy` wrote
# in the repository, inside the denoiser's folder (Triton takes every folder at the root for a model, and
# skips one inside a model that is not a version): the registered LoRA files and voltacache.pipeline.lora.REGISTRY
LORA_FOLDER = f"{DENOISER}/loras"
LORA_RESIDENT = "lora_resident"  # component parameter: LoRA variants kept loaded
SEARCH_NAMES = {t.tensor.name for t in SEARCH_TENSORS} | {t.name for t in SEARCH_OUTPUTS}
DIRECT_NAMES = SEARCH_NAMES | {CANCEL, CANCELLED}  # the denoiser's tensors that no ensemble carries


def ensemble(request: Request) -> str:
    """The ensemble that serves a request."""
    return INPAINT if request.inpaint else IMG2IMG if request.img2img else TXT2IMG


def lora_rows(loras, rows: int) -> np.ndarray:
    """A component's LORAS input: the same "name:scale,..." text on each of its `rows` rows ("" for none)."""
    return np.array([[",".join(str(pair) for pair in loras).encode()]] * rows, dtype=object)


def any_length(t: TensorSpec, axis: int) -> TensorSpec:
    """The tensor with a variable dimension (-1) at `axis`."""
    return replace(t, shape=(*t.shape[:axis], -1, *t.shape[axis + 1 :]))


def prompt_lengths(spec: ComponentSpec, chunks: int) -> ComponentSpec:
    """An engine's spec as Triton sees it: a context of any length when prompts span up to `chunks` chunks."""
    if chunks == 1:
        return spec
    inputs = tuple(any_length(t, PROMPT_AXIS[t.name]) if t.name in PROMPT_AXIS else t for t in spec.inputs)
    return replace(spec, inputs=inputs)


def any_size(spec: ComponentSpec) -> ComponentSpec:
    """An engine's spec as Triton sees it when it serves several image sizes: image-shaped tensors of any
    height and width (the runner checks them against the sizes served)."""

    def sized(tensors):
        return tuple(any_length(any_length(t, 2), 3) if t.name in SPATIAL else t for t in tensors)

    return replace(spec, inputs=sized(spec.inputs), outputs=sized(spec.outputs))


def serving_specs(export) -> dict[str, ComponentSpec]:
    """Specs of every model in the repository: the engine components, the Python models and the ensembles.
    The tokenizer writes a row per chunk of each text (runtime.tokenizer), so the tensors between it and
    the denoiser have any number of rows."""
    engines = component_specs(
        export.geometry, export.batch, export.height, export.width, controlnets=tuple(export.controlnets)
    )
    engines = {name: prompt_lengths(spec, export.max_prompt_chunks) for name, spec in engines.items()}
    several = len(export.image_sizes) > 1
    engines = {name: any_size(spec) if several else spec for name, spec in engines.items()}
    ids = tuple(any_length(t, 0) for t in engines["text_encoder"].inputs)
    embeddings, pooled = (any_length(t, 0) for t in engines["text_encoder"].outputs)
    pixels = images_tensor(export.batch, *((-1, -1) if several else export.size))
    request = tuple(t.tensor for t in REQUEST_TENSORS)
    search = tuple(t.tensor for t in SEARCH_TENSORS)
    txt2img = tuple(t for t in request if t.name not in IMAGE_INPUTS)
    received, computed, key = scalar(RECEIVED_NS, "int64"), scalar(COMPUTED_NS, "int64"), scalar(RESPONSE_KEY, "int64")
    rows = TensorSpec(LORA_ROWS, "object", (ids[0].shape[0], 1))
    assert ids[0].name == INPUT_IDS and embeddings.name == TEXT_EMBEDDINGS
    return {
        **engines,
        TOKENIZER: ComponentSpec(TOKENIZER, txt2img, (*ids, rows, received, key)),
        # the denoiser decodes itself (BLS into vae_decoder), so a cached image skips the decode; it
        # also answers cache_search's requests, as the one process that holds a milvus-lite cache
        DENOISER: ComponentSpec(
            DENOISER,
            (*request, embeddings, pooled, key, *search, CANCEL_INPUT),
            (pixels, *STAT_TENSORS, computed, *SEARCH_OUTPUTS, CANCEL_OUTPUT),
        ),
        POSTPROCESS: ComponentSpec(POSTPROCESS, (pixels, *STAT_TENSORS, computed, received), (pixels, *STAT_TENSORS)),
        TXT2IMG: ComponentSpec(TXT2IMG, txt2img, (pixels, *STAT_TENSORS)),
        IMG2IMG: ComponentSpec(
            IMG2IMG, tuple(t for t in request if t.name not in MASK_INPUTS), (pixels, *STAT_TENSORS)
        ),
        INPAINT: ComponentSpec(INPAINT, request, (pixels, *STAT_TENSORS)),
        CACHE_SEARCH: ComponentSpec(CACHE_SEARCH, search, SEARCH_OUTPUTS),
    }


# inputs a request must send, per model: the prompt, nothing else; the ensembles pass an absent one on as
# absent, and the denoiser applies Request's defaults, or names what is missing (an inpaint request without
# its init image). Triton 2.51 does not check an ensemble's required inputs before it runs the first steps: a
# required input left out leaves the ensemble waiting for it ("unexpected deadlock"), so none is required
# but the one every step reads.
REQUIRED = {
    **{name: {PROMPT} for name in (TOKENIZER, TXT2IMG, IMG2IMG, INPAINT)},
    CACHE_SEARCH: {t.tensor.name for t in SEARCH_TENSORS if not t.optional},
}


def optional_inputs(spec: ComponentSpec) -> set[str]:
    """The inputs of a model a request may leave out. Every one of the denoiser's: a generation
    carries none of the search tensors, a search or a cancel none of the generation's, and the
    denoiser names what is missing."""
    if spec.name == DENOISER:
        return set(spec.input_names)
    return set(spec.input_names) - REQUIRED[spec.name] if spec.name in REQUIRED else set()


def parse_lora_rows(array: np.ndarray) -> tuple[LoraRequest, ...]:
    """The inverse of `lora_rows`: the LoRAs of the first row (every row of a request holds the same)."""
    value = np.asarray(array).reshape(-1)[0]
    text = value.decode() if isinstance(value, bytes) else str(value)
    return tuple(LoraRequest.parse(part) for part in text.split(",") if part)
