"""ControlNet checkpoints for an export: loaded offline (a diffusers ControlNetModel folder or a single
.safetensors file), checked against the model's U-Net, and the tiny presets the tests use.

A ControlNet is a copy of its U-Net's encoder: it fits a model when its blocks, widths and conditioning are the
U-Net's. One that does not is refused here, in one line, before anything is traced.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointError, UsageError
from ..outputs import CONTROLNET, staged_output
from .checkpoint import PICKLE_SUFFIXES
from .single_file import check_safetensors

CONTROLNET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")  # a component and a Triton model name part
# what a ControlNet must share with the U-Net it steers (diffusers' config names)
MATCHING = (
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "down_block_types",
    "transformer_layers_per_block",
    "addition_embed_type",
)
# preset -> the model preset whose U-Net it is made from (ControlNetModel.from_unet); trained ones ship weights
PRESETS = {"controlnet-tiny": "tiny", "controlnet-sdxl-tiny": "sdxl-tiny", "controlnet-sd15": "sd15"}
TRAINED = {"shapes-controlnet": "shapes"}
ZERO_CONV_STD = 0.05  # random presets: residuals that change the image (from_unet starts them at zero)


def parse_controlnet(text: str) -> tuple[str, Path]:
    """`--controlnet NAME=PATH` -> (name, path); the name becomes the component controlnet_NAME."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise UsageError(f"--controlnet {text!r}: give NAME=PATH, e.g. canny=./controlnet-canny")
    if not CONTROLNET_NAME.fullmatch(name):
        raise UsageError(f"--controlnet {text!r}: a name is letters, digits, '_' or '-' (at most 32), e.g. canny")
    return name, Path(path)


def check_controlnet_path(name: str, path: Path, allow_pickle: bool = False) -> None:
    """Refuse a path that cannot hold a ControlNet, before anything heavy is imported."""
    arg = f"--controlnet {name}={path}"
    if not path.exists():
        raise UsageError(f"{arg}: no such file or folder; give a diffusers ControlNetModel folder or a .safetensors")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"{arg}: not a ControlNet folder (no config.json); give the folder save_pretrained wrote")
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UsageError(
            f"{arg}: a pickle checkpoint can run arbitrary code when loaded; convert it to .safetensors, or pass "
            "--allow-pickle if you trust its source"
        )


def load_controlnet(name: str, path: Path, unet_config, allow_pickle: bool = False):
    """The ControlNetModel at `path`, fp32 on the CPU, checked against the U-Net it will steer. A single file
    is read against a config made from that U-Net's (offline: no hub)."""
    import torch
    from diffusers import ControlNetModel

    path, arg = Path(path), f"--controlnet {name}={path}"
    check_controlnet_path(name, path, allow_pickle)
    try:
        if path.is_dir():
            for f in path.glob("*.safetensors"):
                check_safetensors(f)
            model = ControlNetModel.from_pretrained(
                path, local_files_only=True, torch_dtype=torch.float32, use_safetensors=None if allow_pickle else True
            )
        else:
            model = _single_file(path, unet_config)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError) as e:
        first = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{arg}: cannot be loaded as a ControlNet ({first})") from e
    check_fits(name, model.config, unet_config)
    return model.float().eval()


def _single_file(path: Path, unet_config):
    """A single-file ControlNet (the original `control_model.*` layout, or diffusers' own keys), read against a
    ControlNet config made from the model's U-Net."""
    import tempfile

    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file

    if path.suffix.lower() in PICKLE_SUFFIXES:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    else:
        check_safetensors(path)
        state = load_file(path)
    with torch.device("meta"):
        config = dict(ControlNetModel.from_unet(UNet2DConditionModel.from_config(unet_config)).config)
    if any(key.startswith("control_model.") for key in state):  # the original layout: diffusers converts it
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            return ControlNetModel.from_single_file(
                str(path), config=tmp, local_files_only=True, torch_dtype=torch.float32
            )
    model = ControlNetModel.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{len(missing)} weights missing, {len(unexpected)} unexpected, e.g. {(missing or unexpected)[:2]}"
        )
    return model


def check_fits(name: str, controlnet_config, unet_config) -> None:
    """One line when a ControlNet was made for another family or size of U-Net."""
    differs = [
        key
        for key in MATCHING
        if _normal(controlnet_config.get(key)) != _normal(unet_config.get(key)) and key in unet_config
    ]
    if controlnet_config.get("in_channels") not in (unet_config.get("out_channels"), unet_config.get("in_channels")):
        differs.append("in_channels")
    if differs:
        shown = ", ".join(f"{k} {controlnet_config.get(k)} (the U-Net's: {unet_config.get(k)})" for k in differs[:2])
        raise CheckpointError(
            f"--controlnet {name}: made for another family or size of model ({shown}); give a ControlNet trained for "
            "this model's family"
        )


def _normal(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def controlnet_preset(preset: str, seed: int = 0):
    """A ControlNetModel: the trained one shipped (shapes-controlnet), or random weights over the preset's U-Net
    (its zero convolutions random too, so the residuals change the image)."""
    import torch
    from diffusers import ControlNetModel

    from .presets import TRAINED as TRAINED_MODELS
    from .presets import random_pipeline

    if preset in TRAINED:
        root = TRAINED_MODELS[TRAINED[preset]].parent / preset
        return ControlNetModel.from_pretrained(root, torch_dtype=torch.float32)
    unet = random_pipeline(PRESETS[preset], seed).unet
    torch.manual_seed(seed + 1)
    model = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for block in (*model.controlnet_down_blocks, model.controlnet_mid_block):
            torch.nn.init.normal_(block.weight, std=ZERO_CONV_STD)
        torch.nn.init.normal_(model.controlnet_cond_embedding.conv_out.weight, std=ZERO_CONV_STD)
    return model


def write_controlnet(out_dir: Path, preset: str, seed: int = 0, force: bool = False, arg: str = "OUT") -> Path:
    """A ControlNetModel folder (safetensors) that `export --controlnet NAME=DIR` loads offline."""
    with staged_output(out_dir, CONTROLNET, force=force, arg=arg) as stage:
        controlnet_preset(preset, seed).save_pretrained(stage, safe_serialization=True)
        (stage / CONTROLNET.marker).write_text(json.dumps({"preset": preset, "seed": seed}, indent=2))
    return out_dir
