"""The PyTorch modules behind each component spec: what gets exported, and the reference it is checked against.

Each module's forward takes the spec's inputs in the spec's order and returns its outputs in order.
"""

from __future__ import annotations

import torch
from torch import nn

from .specs import TEXT_ENCODER, UNET_DEEP, UNET_SHALLOW, VAE_DECODER, VAE_ENCODER
from .unet_split import UNetDeep, UNetShallow


class TextEncoder(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        # int32 ids in the graph (TensorRT's native index type); the embedding gathers with int64
        out = self.text_encoder(input_ids.to(torch.int64), return_dict=True)
        return out.last_hidden_state, out.pooler_output


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


def torch_modules(pipe, shallow_layers: int) -> dict[str, nn.Module]:
    modules = {
        TEXT_ENCODER: TextEncoder(pipe.text_encoder),
        UNET_DEEP: UNetDeep(pipe.unet, shallow_layers),
        UNET_SHALLOW: UNetShallow(pipe.unet, shallow_layers),
        VAE_DECODER: VaeDecoder(pipe.vae),
        VAE_ENCODER: VaeEncoder(pipe.vae),
    }
    return {name: m.eval() for name, m in modules.items()}
