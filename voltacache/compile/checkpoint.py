"""Load a Stable Diffusion 1.x/2.x or SDXL checkpoint offline: a diffusers folder or a single .safetensors file.

No hub access ever happens (HF_HUB_OFFLINE is forced, every load is local_files_only). Pickle
checkpoints can run code when loaded, so they are refused unless the caller allows them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointError, UsageError
from .single_file import check_safetensors, checkpoint_family, unet_in_channels

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}
# model_index.json's pipeline class -> the pipeline class we load it as (img2img and inpainting folders hold the
# same models)
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLPipeline",
}
OTHER_FAMILIES = {"StableDiffusion3Pipeline": "SD3", "FluxPipeline": "Flux"}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
# a single file's family (voltacache.compile.single_file) -> the shipped configs it is read against
SINGLE_FILE_FAMILIES = {"SD 1.x": "sd15", "SD 2.x": "sd2", "SDXL": "sdxl"}


def load_pipeline(path: str | Path, allow_pickle: bool = False, config: str | Path | None = None):
    """A diffusers StableDiffusionPipeline from `path`, fp32, on the CPU, without a safety checker.

    `config` is the diffusers config folder a single file is read against (default: its family's,
    shipped in the package: SD 1.5, SD 2.1 768-v, SDXL base).
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
        return _load_single_file(path, "SD 1.x", config)
    if suffix != ".safetensors":
        raise CheckpointError(f"{path}: not a checkpoint (expected a diffusers folder or a .safetensors file)")
    try:
        header = check_safetensors(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download or write it again") from e
    family = checkpoint_family(header.keys())
    if family is None:
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint (no U-Net, VAE and CLIP weights found)")
    if family not in SINGLE_FILE_FAMILIES:
        raise CheckpointError(f"{path}: a {family} checkpoint; voltacache loads SD 1.x, SD 2.x and SDXL")
    return _load_single_file(path, family, config, unet_in_channels(header))


def check_model_path(path: Path, allow_pickle: bool = False, arg: str = "--model") -> None:
    """What the command line can be told about a checkpoint path before anything loads: it exists, it is a
    diffusers folder or a single-file checkpoint (a pickle only when allowed), not an output of ours."""
    from ..outputs import kind_of

    path = Path(path)
    give = "give a diffusers folder (with model_index.json) or a single .safetensors checkpoint"
    if not path.exists():
        raise UsageError(f"{arg} {path}: no such file or folder; {give}")
    if path.is_dir():
        kind = kind_of(path)
        if kind is not None and not (path / "model_index.json").is_file():
            raise UsageError(f"{arg} {path}: {kind.article} {kind.what} voltacache wrote, not a model; {give}")
        if not (path / "model_index.json").is_file():
            raise UsageError(f"{arg} {path}: not a diffusers pipeline folder (no model_index.json); {give}")
        _read_model_index(path / "model_index.json", UsageError)
        return
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise UsageError(
            f"{arg} {path}: {suffix} is a pickle checkpoint, which can run arbitrary code when loaded; "
            "convert it to .safetensors, or pass --allow-pickle if you trust its source"
        )
    if suffix not in PICKLE_SUFFIXES and suffix != ".safetensors":
        raise UsageError(f"{arg} {path}: not a checkpoint; {give}")


def _read_model_index(index_file: Path, error: type[Exception]) -> dict:
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        why = f"invalid JSON ({e})"
    else:
        if isinstance(index, dict):
            return index
        why = "not a JSON object"
    raise error(
        f"{index_file}: {why}; copy it again from where the model came from (it names the pipeline, e.g. "
        '{"_class_name": "StableDiffusionPipeline", ...})'
    )


def _load_folder(path: Path, allow_pickle: bool):
    import diffusers

    from .presets import pipeline_options

    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    name = _read_model_index(index_file, CheckpointError).get("_class_name", "")
    if name in OTHER_FAMILIES:
        raise CheckpointError(
            f"{path}: a {OTHER_FAMILIES[name]} pipeline ({name}); voltacache supports SD 1.x/2.x and SDXL"
        )
    if name not in SUPPORTED_PIPELINES:
        raise CheckpointError(
            f"{path}: {name or 'an unnamed pipeline'} is not a Stable Diffusion 1.x/2.x or SDXL pipeline"
        )
    pipeline_class = getattr(diffusers, SUPPORTED_PIPELINES[name])
    xl = "XL" in name
    missing = [c for c in COMPONENTS + (XL_COMPONENTS if xl else ()) if not (path / c).is_dir()]
    if missing:
        refiner = xl and "text_encoder" in missing  # SDXL's refiner has only the second text encoder
        why = " (an SDXL refiner, which has no first text encoder, is not supported)" if refiner else ""
        raise CheckpointError(f"{path}: missing component folder(s): {', '.join(missing)}{why}")
    for component in ("unet", "vae", "text_encoder", *(["text_encoder_2"] if xl else [])):
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
        return pipeline_class.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=None if allow_pickle else True,
            **pipeline_options(pipeline_class),
        )
    except (OSError, ValueError, RuntimeError, EOFError) as e:  # a config, weight or tokenizer file diffusers rejects
        raise CheckpointError(f"{path}: cannot be loaded ({e})") from e


def _load_single_file(path: Path, family: str, config: str | Path | None, in_channels: int | None = None):
    import diffusers

    from .presets import CONFIGS, family_tokenizers, pipeline_options

    ours = SINGLE_FILE_FAMILIES[family]
    config_dir = Path(config) if config else CONFIGS / ours
    pipeline_class = getattr(diffusers, json.loads((CONFIGS / ours / "model_index.json").read_text())["_class_name"])
    try:
        with unet_reading(config_dir, in_channels) as configs:
            return pipeline_class.from_single_file(
                str(path),
                config=str(configs),
                local_files_only=True,
                **family_tokenizers(ours),
                **pipeline_options(pipeline_class),
            )
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        first = " ".join(str(e).split()).split(". If you want", 1)[0]  # diffusers' advice is not ours to give
        if config is None and ("shape" in first or "size" in first):
            raise CheckpointError(
                f"{path}: its weights do not fit the {family} configs voltacache ships ({first}); a checkpoint "
                "of other widths needs --config DIR, the diffusers folder of its architecture (for the single "
                "file `init-tiny --single-file` wrote, the folder init-tiny wrote)"
            ) from e
        raise CheckpointError(f"{path}: could not be loaded against the configs in {config_dir} ({first})") from e


@contextmanager
def unet_reading(config_dir: Path, in_channels: int | None):
    """The config folder, or a copy of it whose U-Net reads `in_channels` where the file's does (an
    inpainting checkpoint's 9: latents, mask and masked image) and the config's does not."""
    unet = json.loads((config_dir / "unet" / "config.json").read_text())
    if in_channels is None or unet.get("in_channels") == in_channels:
        yield config_dir
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copytree(config_dir, Path(tmp) / config_dir.name))
        (copy / "unet" / "config.json").write_text(json.dumps(unet | {"in_channels": in_channels}, indent=2))
        yield copy
