"""Stable Diffusion pipelines of every supported family, built offline: from configs with random weights,
or from the weights we trained and ship.

`sd15`, `sd2` and `sdxl` are the real architectures (the diffusers configs shipped in
voltacache/configs: SD 1.5, SD 2.1 768-v with v-prediction and an OpenCLIP-style text encoder,
SDXL base with its two text encoders); `tiny`, `sd2-tiny` and `sdxl-tiny` keep each family's block
types, cross-attention, text encoders and conditioning at small widths (and, for SDXL, 2 transformer
layers where the real model has 10), so the whole pipeline makes a 64x64 image in seconds on a CPU
(docs/platform.md); `inpaint-tiny` is `tiny` with SD 1.5 inpainting's 9-channel U-Net; `shapes` is
`tiny` trained on captioned shapes (scripts/train_shapes.py): images that show what the prompt asks,
so quality under caching can be measured.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..outputs import PIPELINE, staged_output

# torch, diffusers and transformers are imported where a pipeline is made: `init-tiny --preset typo` is
# refused in a fraction of a second, not after seconds of imports.

CONFIGS = Path(str(resources.files("voltacache") / "configs"))
FAMILIES = ("sd15", "sd2", "sdxl")
SD15_CONFIG_DIR = CONFIGS / "sd15"
# The text encoders and tokenizers of each family; a tokenizer's pad token where it is not CLIP's end
# token (OpenCLIP pads with "!", id 0; the text encoders read the padding, so it must match).
TEXT_ENCODERS = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}  # transformers
TOKENIZERS = {"sd15": {"tokenizer": None}, "sd2": {"tokenizer": "!"}, "sdxl": {"tokenizer": None, "tokenizer_2": "!"}}

# Overrides of the SD 1.5 configs: same block types, tiny widths.
TINY = {
    "unet": {
        "block_out_channels": [32, 64, 64, 64],
        "layers_per_block": 1,
        "attention_head_dim": 4,  # diffusers' historical name: the number of heads
        "norm_num_groups": 8,
        "cross_attention_dim": 64,
        "sample_size": 8,
    },
    "vae": {
        "block_out_channels": [16, 32, 64, 64],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 64,
    },
    "text_encoder": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 64,
    },
}
# The trained preset's latent has 8 channels, not SD 1.5's 4: with 4, the tiny VAE codes each palette color
# by context and decodes unseen (color, background) pairs wrong (75% right, against 99% with 8; see
# docs/benchmarks.md), which would cap held-out adherence below what the U-Net can do.
LATENT_CHANNELS = 8
SHAPES = TINY | {
    "unet": TINY["unet"] | {"in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS},
    "vae": TINY["vae"] | {"latent_channels": LATENT_CHANNELS},
}
# SD 1.5 inpainting's topology at tiny widths: the U-Net reads latents, the mask and the masked image's latents
INPAINT_TINY = TINY | {"unet": TINY["unet"] | {"in_channels": 9}}
SD2_TINY = {
    "unet": TINY["unet"] | {"attention_head_dim": [2, 4, 4, 4]},  # per-block heads, as SD 2's config lists them
    "vae": TINY["vae"],
    "text_encoder": TINY["text_encoder"] | {"projection_dim": 32},
}
SDXL_TINY = {
    "unet": {
        "block_out_channels": [32, 64, 64],
        "attention_head_dim": [2, 4, 4],
        "transformer_layers_per_block": [1, 2, 2],
        "norm_num_groups": 8,
        "cross_attention_dim": 96,  # the two text encoders' widths, concatenated
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 64 + 6 * 8,  # pooled text embedding + 6 time ids
        "sample_size": 8,
    },
    "vae": TINY["vae"],
    "text_encoder": {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2},
    "text_encoder_2": TINY["text_encoder"],
}
# preset -> (family, overrides of the family's configs)
PRESETS = {
    "tiny": ("sd15", TINY),
    "sd15": ("sd15", {}),
    "shapes": ("sd15", SHAPES),
    "inpaint-tiny": ("sd15", INPAINT_TINY),
    "sd2-tiny": ("sd2", SD2_TINY),
    "sd2": ("sd2", {}),
    "sdxl-tiny": ("sdxl", SDXL_TINY),
    "sdxl": ("sdxl", {}),
}
# Presets with trained weights: fp16 safetensors, one diffusers folder per component
TRAINED = {"shapes": Path(str(resources.files("voltacache") / "weights" / "shapes"))}


def component_config(component: str, preset: str = "sd15") -> dict:
    """The config of one component of a preset: its family's, with the preset's overrides."""
    family, overrides = PRESETS[preset]
    config = json.loads((CONFIGS / family / component / "config.json").read_text())
    config.update(overrides.get(component, {}))
    return config


def image_size(preset: str) -> int:
    """The native image side of a preset: VAE sample size."""
    return component_config("vae", preset)["sample_size"]


def random_pipeline(preset: str = "tiny", seed: int = 0):
    """A diffusers pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline) with the preset's
    topology and seeded random weights."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    family = PRESETS[preset][0]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(component_config("unet", preset))
    vae = AutoencoderKL.from_config(component_config("vae", preset))
    encoders = {}
    for name, cls in TEXT_ENCODERS.items():
        if (CONFIGS / family / name).is_dir():
            config = {k: v for k, v in component_config(name, preset).items() if k != "architectures"}
            encoders[name] = getattr(transformers, cls)(transformers.CLIPTextConfig(**config))
    return assemble(family, unet=unet, vae=vae, **encoders)


def trained_pipeline(preset: str):
    """The shipped weights of a trained preset, in fp32 (fp16 is only how they are stored)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = TRAINED[preset]
    return assemble(
        PRESETS[preset][0],
        unet=UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32),
        vae=AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=torch.float32),
    )


def family_tokenizers(family: str) -> dict:
    """The real CLIP tokenizer(s) of a family, built offline, by pipeline component name."""
    from .clip_vocab import clip_tokenizer

    return {name: clip_tokenizer(pad_token=pad) for name, pad in TOKENIZERS[family].items()}


def pipeline_options(pipeline_class) -> dict:
    """What every pipeline we load or build is given: no safety checker (SD), no invisible watermark (SDXL,
    which would change the pixels diffusers' parity is measured on)."""
    if "XL" in pipeline_class.__name__:
        return {"add_watermarker": False}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def assemble(family: str, **models):
    """The family's pipeline of these models, with its real tokenizers and its scheduler config."""
    import diffusers

    root = CONFIGS / family
    index = json.loads((root / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, index["_class_name"])
    if models["unet"].config.in_channels != models["unet"].config.out_channels:  # written as SD 1.5 inpainting's
        pipeline_class = diffusers.StableDiffusionInpaintPipeline
    scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(root, subfolder="scheduler")
    return pipeline_class(
        **models, **family_tokenizers(family), scheduler=scheduler, **pipeline_options(pipeline_class)
    )


# Written beside model_index.json by `write_pipeline`: what marks the folder as ours to replace (a
# downloaded diffusers folder has a model_index.json too, and must never be replaced).
PRESET_MARKER = PIPELINE.marker


def write_pipeline(out_dir: Path, preset: str = "tiny", seed: int = 0, force: bool = False, arg: str = "OUT") -> Path:
    """Write a diffusers-format folder (safetensors weights) that from_pretrained loads offline: the
    preset's trained weights, or random ones from the seed.

    Written into a temporary sibling and renamed into place when complete; an existing folder is
    replaced only with `force` and only when this function wrote it (voltacache_preset.json)."""
    with staged_output(out_dir, PIPELINE, force=force, arg=arg) as stage:
        pipe = trained_pipeline(preset) if preset in TRAINED else random_pipeline(preset, seed)
        pipe.save_pretrained(stage, safe_serialization=True)
        (stage / PRESET_MARKER).write_text(json.dumps({"preset": preset, "seed": seed}, indent=2))
    return out_dir
