"""The request and response of the txt2img / img2img ensembles, and the models between them.

Like voltacache.specs for the engines: the model repository writer, the Python models and the
client all read tensor names, dtypes and shapes from here.
"""

from __future__ import annotations

from ..specs import IMAGE, INPUT_IDS, TEXT_EMBEDDINGS, ComponentSpec, Geometry, TensorSpec, component_specs

# Request tensors (what a client sends).
PROMPT = "PROMPT"
NEGATIVE_PROMPT = "NEGATIVE_PROMPT"
STEPS = "STEPS"
GUIDANCE = "GUIDANCE"
SEED = "SEED"  # -1: the server draws one (and reports it)
SCHEDULER = "SCHEDULER"
CACHE_INTERVAL = "CACHE_INTERVAL"
CACHE = "CACHE"  # on | off | refresh: the cross-request cache for this request
INIT_IMAGE = "INIT_IMAGE"
STRENGTH = "STRENGTH"
# Response tensors.
IMAGES = "IMAGES"
SEED_USED = "SEED_USED"
UNET_DEEP_CALLS = "UNET_DEEP_CALLS"
UNET_SHALLOW_CALLS = "UNET_SHALLOW_CALLS"
STEPS_COMPUTED = "STEPS_COMPUTED"
CACHE_LAYER = "CACHE_LAYER"  # semantic | approximate | miss | off
SIMILARITY = "SIMILARITY"

# Model names in the repository.
TOKENIZER = "tokenizer"
DENOISER = "denoiser"
POSTPROCESS = "postprocess"
TXT2IMG = "txt2img"
IMG2IMG = "img2img"

MAX_PROMPT_BYTES = 4096  # a prompt is at most 77 tokens; far beyond that is a client bug or abuse
RANDOM_SEED = -1


def scalar(name: str, dtype: str) -> TensorSpec:
    return TensorSpec(name, dtype, (1,))


PARAMETERS = (
    scalar(STEPS, "int32"),
    scalar(GUIDANCE, "float32"),
    scalar(SEED, "int64"),
    scalar(SCHEDULER, "object"),
    scalar(CACHE_INTERVAL, "int32"),
    scalar(CACHE, "object"),
)
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
    ids = engines["text_encoder"].inputs[0]
    embeddings, pooled = engines["text_encoder"].outputs
    image = engines["vae_decoder"].outputs[0]
    pixels = TensorSpec(IMAGES, "uint8", (export["batch"], export["height"], export["width"], 3))
    init_image = TensorSpec(INIT_IMAGE, "uint8", (export["height"], export["width"], 3))
    prompts = (scalar(PROMPT, "object"), scalar(NEGATIVE_PROMPT, "object"))
    assert ids.name == INPUT_IDS and embeddings.name == TEXT_EMBEDDINGS and image.name == IMAGE
    return {
        **engines,
        TOKENIZER: ComponentSpec(TOKENIZER, prompts, (ids,)),
        # the denoiser decodes itself (BLS into vae_decoder), so a cached image skips the decode
        DENOISER: ComponentSpec(
            DENOISER,
            (*prompts, embeddings, pooled, *PARAMETERS, init_image, scalar(STRENGTH, "float32")),
            (image, *STATS),
        ),
        POSTPROCESS: ComponentSpec(POSTPROCESS, (image,), (pixels,)),
        TXT2IMG: ComponentSpec(TXT2IMG, (*prompts, *PARAMETERS), (pixels, *STATS)),
        IMG2IMG: ComponentSpec(
            IMG2IMG, (*prompts, *PARAMETERS, init_image, scalar(STRENGTH, "float32")), (pixels, *STATS)
        ),
    }


OPTIONAL_INPUTS = {DENOISER: {INIT_IMAGE, STRENGTH}}
