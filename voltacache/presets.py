"""Stable Diffusion pipelines with SD 1.5's topology, built offline: from configs with random weights,
or from the weights we trained and ship.

`sd15` is the real SD 1.5 architecture (the configs shipped in voltacache/configs/sd15);
`tiny` keeps every block type, cross-attention and the CLIP text model, at small widths, so the
whole pipeline makes a 64x64 image in a few seconds on a CPU (docs/platform.md);
`shapes` is `tiny` trained on captioned shapes (scripts/train_shapes.py): images that show what the
prompt asks, so quality under caching can be measured.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import clip_tokenizer

SD15_CONFIG_DIR = Path(str(resources.files("voltacache") / "configs" / "sd15"))

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
PRESETS = {"tiny": TINY, "sd15": {}, "shapes": SHAPES}
# Presets with trained weights: fp16 safetensors, one diffusers folder per component
TRAINED = {"shapes": Path(str(resources.files("voltacache") / "weights" / "shapes"))}


def component_config(component: str, preset: str = "sd15") -> dict:
    """The config of one component of a preset: SD 1.5's, with the preset's overrides."""
    config = json.loads((SD15_CONFIG_DIR / component / "config.json").read_text())
    config.update(PRESETS[preset].get(component, {}))
    return config


def image_size(preset: str) -> int:
    """The native image side of a preset: VAE sample size."""
    return component_config("vae", preset)["sample_size"]


def random_pipeline(preset: str = "tiny", seed: int = 0) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with the preset's topology and seeded random weights."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(component_config("unet", preset))
    vae = AutoencoderKL.from_config(component_config("vae", preset))
    text_config = {k: v for k, v in component_config("text_encoder", preset).items() if k != "architectures"}
    return assemble(unet, vae, CLIPTextModel(CLIPTextConfig(**text_config)))


def trained_pipeline(preset: str) -> StableDiffusionPipeline:
    """The shipped weights of a trained preset, in fp32 (fp16 is only how they are stored)."""
    root = TRAINED[preset]
    return assemble(
        UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32),
        AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32),
        CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=torch.float32),
    )


def assemble(unet, vae, text_encoder) -> StableDiffusionPipeline:
    """A pipeline of these models with the real CLIP tokenizer and SD 1.5's scheduler config."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# Written beside model_index.json by `write_pipeline`: what marks the folder as ours to replace (a
# downloaded diffusers folder has a model_index.json too, and must never be replaced).
PRESET_MARKER = "voltacache_preset.json"


def is_written_pipeline(folder: Path) -> bool:
    """Whether `folder` is a pipeline `write_pipeline` wrote."""
    from .outputs import json_marker

    return (Path(folder) / "model_index.json").is_file() and json_marker(PRESET_MARKER, "preset")(folder)


is_written_pipeline.marker = PRESET_MARKER


def write_pipeline(out_dir: Path, preset: str = "tiny", seed: int = 0, force: bool = False, arg: str = "OUT") -> Path:
    """Write a diffusers-format folder (safetensors weights) that from_pretrained loads offline: the
    preset's trained weights, or random ones from the seed.

    Written into a temporary sibling and renamed into place when complete; an existing folder is
    replaced only with `force` and only when this function wrote it (voltacache_preset.json)."""
    from .outputs import staged_output

    with staged_output(out_dir, force=force, ours=is_written_pipeline, arg=arg, what="pipeline folder") as stage:
        pipe = trained_pipeline(preset) if preset in TRAINED else random_pipeline(preset, seed)
        pipe.save_pretrained(stage, safe_serialization=True)
        (stage / PRESET_MARKER).write_text(json.dumps({"preset": preset, "seed": seed}, indent=2))
    return out_dir
