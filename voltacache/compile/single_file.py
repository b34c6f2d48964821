"""The original single-file (LDM / SGM, A1111) layout of SD 1.x, SD 2.x and SDXL checkpoints: family
detection and writing.

diffusers reads this layout (`from_single_file`); we add the two things it lacks: telling the
family from the header alone, before any weight is read, and writing a diffusers pipeline back
to the layout (tests and users who need a single file make one from a folder).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

# A key that only that family has, checked in order (the SD 1.x / 2.x keys are shared, so last).
FAMILY_KEYS = [
    ("SD3", "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"),
    ("Flux", "double_blocks.0.img_attn.qkv.weight"),
    ("SDXL", "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"),
    ("SDXL", "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"),
    ("SD 2.x", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"),
    ("SD 1.x", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"),
]
UNET, VAE = "model.diffusion_model.", "first_stage_model."
# family -> {text encoder: (its prefix in the file, layout)}: OpenAI CLIP keeps transformers' names under
# `transformer.`, OpenCLIP (SD 2.x's encoder, SDXL's second) its own under `model.`
TEXT_ENCODERS = {
    "SD 1.x": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "SD 2.x": {"text_encoder": ("cond_stage_model.model.", "open_clip")},
    "SDXL": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip"),
    },
}


def _read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError("header length is implausible: not a safetensors file")
        raw = f.read(n)
        if len(raw) != n:
            raise ValueError("file ends inside its header: truncated")
        header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return n, header


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file: tensor names, dtypes, shapes; no tensor is read."""
    return _read_header(path)[1]


def check_safetensors(path: Path) -> dict:
    """The header of a .safetensors file whose size is what its header describes; a torn or padded
    file raises ValueError (OSError if it cannot be read). No tensor is read."""
    n, header = _read_header(path)
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError) as e:
        raise ValueError(f"header has no valid data_offsets ({e})") from e
    expected, size = 8 + n + end, Path(path).stat().st_size
    if size < expected:
        raise ValueError(f"truncated: {size} bytes, its header describes {expected}")
    if size > expected:
        raise ValueError(f"{size - expected} bytes past the end its header describes")
    return header


MARKER = {"written_by": "voltacache"}  # in the metadata of every single file `save_single_file` wrote


def is_our_single_file(path: Path) -> bool:
    try:
        metadata = safetensors_header(path).get("__metadata__") or {}
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(metadata, dict) and all(metadata.get(k) == v for k, v in MARKER.items())


def model_family(pipe) -> str:
    """SD 1.x, SD 2.x (OpenCLIP's text encoder: gelu where OpenAI's CLIP has quick_gelu) or SDXL (two encoders)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "SDXL"
    return "SD 2.x" if pipe.text_encoder.config.hidden_act == "gelu" else "SD 1.x"


def unet_in_channels(header: dict) -> int | None:
    """The U-Net's input channels, read off a single file's header: 4, or 9 for SD 1.5 inpainting's U-Net."""
    shape = header.get(UNET + "input_blocks.0.0.weight", {}).get("shape")
    return shape[1] if isinstance(shape, list) and len(shape) == 4 else None


def checkpoint_family(keys) -> str | None:
    keys = set(keys)
    return next((family for family, key in FAMILY_KEYS if key in keys), None)


UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_modules(config: dict) -> dict[str, tuple[str, dict]]:
    """diffusers module prefix -> (LDM prefix, renames inside the module)."""
    layers = config["layers_per_block"]
    modules = {
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "add_embedding.linear_1": ("label_emb.0.0", {}),  # SDXL's pooled text + size/crop embedding
        "add_embedding.linear_2": ("label_emb.0.2", {}),
        "conv_in": ("input_blocks.0.0", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET),
    }
    for i, up_type in enumerate(config["up_block_types"]):
        for j in range(layers):
            ldm = f"input_blocks.{1 + i * (layers + 1) + j}"
            modules[f"down_blocks.{i}.resnets.{j}"] = (f"{ldm}.0", UNET_RESNET)
            modules[f"down_blocks.{i}.attentions.{j}"] = (f"{ldm}.1", {})
        modules[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * (layers + 1)}.0.op", {})
        for j in range(layers + 1):
            ldm = f"output_blocks.{i * (layers + 1) + j}"
            modules[f"up_blocks.{i}.resnets.{j}"] = (f"{ldm}.0", UNET_RESNET)
            modules[f"up_blocks.{i}.attentions.{j}"] = (f"{ldm}.1", {})
        upsampler_index = 2 if up_type.startswith("CrossAttn") else 1
        modules[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{i * (layers + 1) + layers}.{upsampler_index}", {})
    return modules


def _vae_modules(config: dict) -> dict[str, tuple[str, dict]]:
    n = len(config["block_out_channels"])
    modules = {}
    for part in ("encoder", "decoder"):
        modules[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", VAE_RESNET)
        modules[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", VAE_RESNET)
        modules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION)
        modules[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
    for i in range(n):
        for j in range(config["layers_per_block"] + 1):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", VAE_RESNET)
        modules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
        modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", {})
    return modules


def _rename(state_dict: dict, modules: dict[str, tuple[str, dict]], prefix: str) -> dict:
    out = {}
    for key, value in state_dict.items():
        module = max((m for m in modules if key.startswith(m + ".")), key=len, default=None)
        ldm, inner = modules[module] if module else ("", {})
        tail = key[len(module) + 1 :] if module else key
        for old, new in inner.items():
            if tail.startswith(old + "."):
                tail = new + tail[len(old) :]
                break
        if inner is VAE_ATTENTION and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
        out[prefix + (f"{ldm}.{tail}" if ldm else tail)] = value
    return out


# OpenCLIP's names for CLIP text model weights (transformers' names without `text_model.`)
OPEN_CLIP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def _clip(state_dict: dict) -> dict:
    # Real files name CLIP's weights text_model.*; transformers 5 drops that prefix from CLIPTextModel.
    return {"text_model." + k.removeprefix("text_model."): v for k, v in state_dict.items()}


def _open_clip(state_dict: dict) -> dict:
    """A CLIP text model in OpenCLIP's layout: q, k, v in one `in_proj`, the projection as a matrix
    that multiplies from the right (diffusers transposes it back)."""
    state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out = {}
    for key, value in state_dict.items():
        if key in OPEN_CLIP:
            out[OPEN_CLIP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        else:
            match = LAYER_KEY.fullmatch(key)
            i, module, param = match.groups() if match else (None, key, None)
            if module in OPEN_CLIP_LAYER:
                out[f"transformer.resblocks.{i}.{OPEN_CLIP_LAYER[module]}.{param}"] = value
            elif module == "self_attn.q_proj":
                qkv = [state_dict[f"encoder.layers.{i}.self_attn.{x}_proj.{param}"] for x in "qkv"]
                import torch

                out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(qkv)
            elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
                raise KeyError(f"text encoder weight {key} has no OpenCLIP name")
    return out


def save_single_file(pipe, path: Path, force: bool = False, arg: str = "--single-file") -> Path:
    """Write an SD 1.x, SD 2.x or SDXL diffusers pipeline as one LDM/SGM-layout .safetensors checkpoint,
    the layout the original repositories, A1111 and diffusers' `from_single_file` use.

    Written beside `path` and renamed into place when complete; an existing file is replaced only
    with `force` and only when this function wrote it (its metadata says so)."""
    from safetensors.torch import save_file

    from ..outputs import staged_file

    state = {}
    state.update(_rename(pipe.unet.state_dict(), _unet_modules(pipe.unet.config), UNET))
    state.update(_rename(pipe.vae.state_dict(), _vae_modules(pipe.vae.config), VAE))
    for name, (prefix, layout) in TEXT_ENCODERS[model_family(pipe)].items():
        weights = (_clip if layout == "clip" else _open_clip)(getattr(pipe, name).state_dict())
        state.update({prefix + k: v for k, v in weights.items()})
    tensors = {k: v.contiguous() for k, v in state.items()}
    with staged_file(path, force=force, ours=is_our_single_file, arg=arg, what="single-file checkpoint") as stage:
        save_file(tensors, str(stage), metadata={"format": "pt", **MARKER})
    return path
