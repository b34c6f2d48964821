"""Small helpers the tests share: the CLI as a user runs it, and what a folder holds."""

from __future__ import annotations

import hashlib

import numpy as np

PROMPT = "a photo of an astronaut riding a horse"  # the prompt of the parity tests
OTHER_MODELS_PROMPT = PROMPT  # conftest's cached_server holds an entry of another model for it

# Every port a `milvus-server` takes besides its proxy port: a test server needs its own of each.
MILVUS_PORTS = (
    "etcd",
    "root-coord",
    "proxy-internal",
    "query-coord",
    "query-node",
    "index-coord",
    "index-node",
    "data-coord",
    "data-node",
)


def cli(*args):
    """`voltacache ARGS...` in this process (typer's runner: stdout and stderr apart)."""
    from typer.testing import CliRunner

    from voltacache.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, code, *fragments):
    """The failure a user sees: exit `code`, one `error:` line on stderr holding `fragments`, no traceback."""
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(folder):
    """Every file under `folder`, by relative path, with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def diffusers_image(pipe, scheduler, seed, steps=20, guidance=7.5, negative="", pipeline_class=None, **kwargs):
    """diffusers' own image for PROMPT, from a pipeline of its own over `pipe`'s modules (the shared `pipe`
    keeps its scheduler). Our empty negative prompt is diffusers' None: SDXL zeros it
    (force_zeros_for_empty_prompt), SD 1.x/2.x encode "" either way."""
    import torch

    from voltacache.schedulers import make_scheduler

    components = {**pipe.components, "scheduler": make_scheduler(scheduler, dict(pipe.scheduler.config))}
    extra = {"add_watermarker": False} if "XL" in type(pipe).__name__ else {}
    other = (pipeline_class or type(pipe))(**components, **extra)
    other.set_progress_bar_config(disable=True)
    return other(
        PROMPT,
        negative_prompt=negative or None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        **kwargs,
    ).images[0]


def diffusers_from_embeddings(pipe, positive, negative, seed, steps, pooled=None, negative_pooled=None):
    """diffusers' own image (DDIM, guidance 7.5) from prompt embeddings built by a test (and SDXL's pooled ones)."""
    import torch

    from voltacache.schedulers import make_scheduler

    xl = pooled is not None
    components = {**pipe.components, "scheduler": make_scheduler("ddim", dict(pipe.scheduler.config))}
    other = type(pipe)(**components, **({"add_watermarker": False} if xl else {}))
    other.set_progress_bar_config(disable=True)
    extra = dict(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled) if xl else {}
    return other(
        prompt_embeds=positive,
        negative_prompt_embeds=negative,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(seed),
        **extra,
    ).images[0]


def close_to_diffusers(ours, reference, max_levels=1, max_fraction=0.005) -> bool:
    """Within 1 of 255 levels on at most 0.5% of the values: every comparison with diffusers."""
    worst, fraction = levels(ours, reference)
    return worst <= max_levels and fraction <= max_fraction


# inpainting's init image and mask (the tests of voltacache's inpainting and of LoRA with it)
INIT = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
MASK = np.zeros((64, 64), np.uint8)
MASK[16:48, 8:40] = 255


def diffusers_inpaint(pipe, scheduler, seed, steps, strength, init=INIT, mask=MASK):
    """diffusers' StableDiffusionInpaintPipeline over `pipe`'s modules: the image inpainting is checked against."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from voltacache.schedulers import make_scheduler

    sched = make_scheduler(scheduler, dict(pipe.scheduler.config))
    inpaint = StableDiffusionInpaintPipeline(**{**pipe.components, "scheduler": sched})
    return inpaint(
        PROMPT,
        image=Image.fromarray(init),
        mask_image=Image.fromarray(mask),
        strength=strength,
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]


def levels(a, b):
    """The largest difference between two uint8 images, in levels, and the share of values that differ."""
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    return diff.max(), (diff > 0).mean()


LORA_UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
LORA_TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def write_lora(pipe, path, seed=0, rank=4, alpha=8, text_encoder=True, kohya=False, std=0.1):
    """A LoRA for `pipe` (untouched: its modules are copied) with random layers, saved as diffusers saves
    one, or in kohya's layout (diffusers' own converter): the files users bring."""
    import copy

    import safetensors.torch
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    unet, encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=list(LORA_UNET_LAYERS))
    )
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
    if text_encoder:
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=list(LORA_TEXT_LAYERS))
        encoder.add_adapter(config)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(encoder)
    with torch.no_grad():  # PEFT's random init makes tiny changes; these make the LoRA show in the image
        for values in layers.values():
            for value in values.values():
                value.copy_(torch.randn_like(value) * std)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not kohya:
        StableDiffusionPipeline.save_lora_weights(path.parent, weight_name=path.name, **layers)
        return path
    state = {}
    # kohya's keys: lora_unet_down_blocks_0_..., lora_te_text_model_encoder_layers_0_... (CLIP's older layout)
    kohya_prefixes = (("unet", "unet_lora_layers"), ("text_encoder.text_model", "text_encoder_lora_layers"))
    for prefix, values in ((prefix, layers.get(key, {})) for prefix, key in kohya_prefixes):
        converted = convert_state_dict_to_kohya({f"{prefix}.{k}": v for k, v in values.items()})
        state.update({k: v.contiguous() for k, v in converted.items()})
    safetensors.torch.save_file(state, path)
    return path


def fused_pipeline(pipe, loras):
    """diffusers' own answer: a copy of `pipe` with each (file, scale) loaded by load_lora_weights and fused."""
    import copy

    other = type(pipe)(**{k: copy.deepcopy(v) for k, v in pipe.components.items()})
    names = []
    for i, (path, _) in enumerate(loras):
        other.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    if len(loras) == 1:
        other.fuse_lora(lora_scale=loras[0][1], adapter_names=names)
    else:
        other.set_adapters(names, adapter_weights=[scale for _, scale in loras])
        other.fuse_lora(adapter_names=names)
    other.unload_lora_weights()
    return other
