"""Load a Stable Diffusion 1.x/2.x checkpoint offline: a diffusers folder or a single .safetensors file.

No hub access ever happens (HF_HUB_OFFLINE is forced, every load is local_files_only). Pickle
checkpoints can run code when loaded, so they are refused unless the caller allows them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CheckpointError
from .single_file import check_safetensors, checkpoint_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}
SUPPORTED_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"}
OTHER_FAMILIES = {
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusionXLImg2ImgPipeline": "SDXL",
    "StableDiffusion3Pipeline": "SD3",
    "FluxPipeline": "Flux",
}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_pipeline(path: str | Path, allow_pickle: bool = False, config: str | Path | None = None):
    """A diffusers StableDiffusionPipeline from `path`, fp32, on the CPU, without a safety checker.

    `config` is the diffusers config folder a single file is read against (default: SD 1.5's,
    shipped in the package).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_folder(path, allow_pickle)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: {suffix} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "convert it to .safetensors, or pass --allow-pickle if you trust its source"
            )
        return _load_single_file(path, config)
    if suffix != ".safetensors":
        raise CheckpointError(f"{path}: not a checkpoint (expected a diffusers folder or a .safetensors file)")
    try:
        keys = check_safetensors(path).keys()
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download or write it again") from e
    family = checkpoint_family(keys)
    if family is None:
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint (no U-Net, VAE and CLIP weights found)")
    if family != "SD 1.x":
        raise CheckpointError(
            f"{path}: a {family} checkpoint; voltacache loads SD 1.x single files (SD 2.x: use its diffusers folder)"
        )
    return _load_single_file(path, config)


def _load_folder(path: Path, allow_pickle: bool):
    from diffusers import StableDiffusionPipeline

    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_file}: invalid JSON ({e})") from e
    name = index.get("_class_name", "")
    if name in OTHER_FAMILIES:
        raise CheckpointError(f"{path}: a {OTHER_FAMILIES[name]} pipeline ({name}); voltacache supports SD 1.x/2.x")
    if name not in SUPPORTED_PIPELINES:
        raise CheckpointError(f"{path}: {name or 'an unnamed pipeline'} is not a Stable Diffusion 1.x/2.x pipeline")
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise CheckpointError(f"{path}: missing component folder(s): {', '.join(missing)}")
    for component in ("unet", "vae", "text_encoder"):
        files = list((path / component).iterdir())
        weights = sorted(f for f in files if f.suffix == ".safetensors")
        for f in weights:  # a torn download or copy, named here rather than deep inside from_pretrained
            try:
                check_safetensors(f)
            except (ValueError, OSError, UnicodeDecodeError) as e:
                raise CheckpointError(
                    f"{f}: corrupt or truncated weights ({e}); download or write this file again"
                ) from e
        if weights:
            continue
        pickles = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
        if not pickles:
            raise CheckpointError(f"{path / component}: no weights found")
        if not allow_pickle:
            raise CheckpointError(
                f"{path / component}: only pickle weights ({', '.join(pickles)}), which can run arbitrary code "
                "when loaded; pass --allow-pickle if you trust the source"
            )
    try:
        return StableDiffusionPipeline.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=None if allow_pickle else True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError, RuntimeError, EOFError) as e:  # a config, weight or tokenizer file diffusers rejects
        raise CheckpointError(f"{path}: cannot be loaded ({e})") from e


def _load_single_file(path: Path, config: str | Path | None):
    from diffusers import StableDiffusionPipeline

    from .presets import SD15_CONFIG_DIR
    from .tokenizer import clip_tokenizer

    config_dir = Path(config) if config else SD15_CONFIG_DIR
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config_dir),
            local_files_only=True,
            tokenizer=clip_tokenizer(),
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: could not be loaded against the configs in {config_dir} ({e})") from e
