"""The PyTorch modules behind each component spec: what gets exported, and the reference it is checked against.

Each module's forward takes the spec's inputs in the spec's order and returns its outputs in order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..specs import TEXT_ENCODER, UNET_DEEP, UNET_SHALLOW, VAE_DECODER, VAE_ENCODER, controlnet_component
from .unet_split import UNetDeep, UNetShallow


class TextEncoder(nn.Module):
    """Token ids -> (context, pooled embedding), as diffusers encodes a prompt. SD 1.x/2.x: the last hidden
    state and CLIP's pooled output. SDXL: both encoders' penultimate hidden states side by side, and the
    second encoder's projected pooled embedding."""

    def __init__(self, text_encoder, text_encoder_2=None):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

    def forward(self, input_ids, input_ids_2=None):
        # int32 ids in the graph (TensorRT's native index type); the embedding gathers with int64
        if self.text_encoder_2 is None:
            out = self.text_encoder(input_ids.to(torch.int64), return_dict=True)
            return out.last_hidden_state, out.pooler_output
        first = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        second = self.text_encoder_2(input_ids_2.to(torch.int64), output_hidden_states=True, return_dict=True)
        return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


class VaeDecoder(nn.Module):
    """Latent (already divided by the scaling factor) -> image in [-1, 1], as `vae.decode`."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoder(nn.Module):
    """Image in [-1, 1] -> mean and std of the latent distribution (the pipeline samples with its own seed)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        dist = self.vae.encode(image, return_dict=False)[0]
        return dist.mean, dist.std


class ControlNet(nn.Module):
    """(latents, timestep, context, SDXL's pooled embedding and time ids, control image in [0, 1], a conditioning
    scale per row) -> the down-block residuals and the mid block's, scaled, as diffusers' ControlNetModel returns
    them for one scale (it multiplies every residual by it: here each row by its own, so that requests with
    different scales share a call)."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet
        self.conditioned = controlnet.config.addition_embed_type == "text_time"

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        *conditions, image, scale = extra
        added = {"text_embeds": conditions[0], "time_ids": conditions[1]} if self.conditioned else None
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond=image,
            conditioning_scale=1.0,
            added_cond_kwargs=added,
            return_dict=False,
        )
        scale = scale[:, None, None, None]
        return (*(r * scale for r in down), mid * scale)


def torch_modules(pipe, shallow_layers: int, controlnets: dict | None = None) -> dict[str, nn.Module]:
    """The module of every component; `controlnets`: {name: diffusers ControlNetModel} of an export's ControlNets."""
    modules = {
        TEXT_ENCODER: TextEncoder(pipe.text_encoder, getattr(pipe, "text_encoder_2", None)),
        UNET_DEEP: UNetDeep(pipe.unet, shallow_layers),
        UNET_SHALLOW: UNetShallow(pipe.unet, shallow_layers),
        VAE_DECODER: VaeDecoder(pipe.vae),
        VAE_ENCODER: VaeEncoder(pipe.vae),
        **{controlnet_component(name): ControlNet(model) for name, model in (controlnets or {}).items()},
    }
    return {name: m.eval() for name, m in modules.items()}
