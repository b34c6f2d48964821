"""The U-Net split at the DeepCache skip point, as two real modules that export to two graphs.

DeepCache (Ma et al., CVPR 2024) patches `forward` at run time; here the split is explicit:

- `UNetDeep`: the whole U-Net forward, returning the noise prediction and the deep feature, the
  hidden state that enters layer `n - shallow_layers` of `up_blocks[-1]` (n = its layer count).
- `UNetShallow`: the time embedding, conv_in, the first `shallow_layers - 1` layers of
  `down_blocks[0]` (their outputs are the skips the shallow up-layers consume; the downsampler only
  feeds the deep part), the last `shallow_layers` layers of `up_blocks[-1]` fed with the cached deep
  feature, and the output head.

`shallow_layers = n` is the block-level split (deep feature = input of `up_blocks[-1]`);
`shallow_layers = 1` is DeepCache's branch 0 (conv_in, the last resnet/attention, conv_out).
Written for SD 1.x/2.x and SDXL U-Nets: SDXL's added conditions (pooled text embedding and time ids,
`addition_embed_type="text_time"`) follow the models' own inputs; no class embeddings. A U-Net exported for
ControlNets (`residuals` > 0) takes the residuals last, as diffusers adds them: each down-block residual to its
skip (the hidden state going down is untouched), the mid block's to its output. The shallow model's skips are
the first `shallow_layers` of the full U-Net's, so it takes only those residuals.
"""

from __future__ import annotations

import torch
from torch import nn


def shallow_layer_count(unet, branch: str) -> int:
    """Layers of up_blocks[-1] that the shallow model runs: all for 'block', branch + 1 for a DeepCache branch."""
    n = len(unet.up_blocks[-1].resnets)
    if branch == "block":
        return n
    if branch.isdigit() and int(branch) < n:
        return int(branch) + 1
    raise ValueError(f"DeepCache branch {branch!r}: use 'block' or a layer number 0..{n - 1} of block 0")


def _time_embedding(unet, sample, timestep, context, text_embeds=None, time_ids=None) -> torch.Tensor:
    """The embedding every resnet reads, as UNet2DConditionModel.forward builds it."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep))
    if time_ids is not None:  # SDXL: the pooled text embedding and the size conditioning, added to the time embedding
        emb = emb + unet.get_aug_embed(emb, context, {"text_embeds": text_embeds, "time_ids": time_ids})
    return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


def _layer(block, i: int, hidden, temb, context) -> torch.Tensor:
    """Layer i of a block: resnet i, then attention i where the block has attentions."""
    hidden = block.resnets[i](hidden, temb)
    if getattr(block, "attentions", None) is not None:
        hidden = block.attentions[i](hidden, encoder_hidden_states=context, return_dict=False)[0]
    return hidden


def _up_layers(block, hidden, skips: list, temb, context, layers: range) -> torch.Tensor:
    """Layers of an up block: each concatenates the last skip before its resnet."""
    for i in layers:
        hidden = _layer(block, i, torch.cat([hidden, skips.pop()], dim=1), temb, context)
    return hidden


def _head(unet, hidden: torch.Tensor) -> torch.Tensor:
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))


def _inputs(unet, extra: tuple) -> tuple[tuple, tuple]:
    """The positional inputs after the model's own: (SDXL's pooled embedding and time ids, or (None, None)),
    then the ControlNet residuals (maybe none)."""
    if unet.config.addition_embed_type == "text_time":
        return tuple(extra[:2]), tuple(extra[2:])
    return (None, None), tuple(extra)


def _controlled(skips: list, residuals: tuple) -> list:
    """The skips with the ControlNet's residuals added (those it has: the shallow model gets its own only)."""
    return [skip + r for skip, r in zip(skips, residuals)] + skips[len(residuals) :] if residuals else skips


class UNetDeep(nn.Module):
    """Full U-Net step that also returns the deep feature; equals the unsplit U-Net."""

    def __init__(self, unet, shallow_layers: int):
        super().__init__()
        self.unet = unet
        self.start = len(unet.up_blocks[-1].resnets) - shallow_layers

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        """`extra`: SDXL's pooled embedding and time ids, then the ControlNet residuals (down blocks', mid's)."""
        unet, context = self.unet, encoder_hidden_states
        (pooled_embedding, time_ids), residuals = _inputs(unet, extra)
        temb = _time_embedding(unet, sample, timestep, context, pooled_embedding, time_ids)
        hidden = unet.conv_in(sample)
        skips = [hidden]
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, res = block(hidden_states=hidden, temb=temb, encoder_hidden_states=context)
            else:
                hidden, res = block(hidden_states=hidden, temb=temb)
            skips.extend(res)
        skips = _controlled(skips, residuals[:-1])
        hidden = unet.mid_block(hidden, temb, encoder_hidden_states=context)
        if residuals:
            hidden = hidden + residuals[-1]
        for block in unet.up_blocks[:-1]:
            res, skips = tuple(skips[-len(block.resnets) :]), skips[: -len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                hidden = block(
                    hidden_states=hidden, temb=temb, res_hidden_states_tuple=res, encoder_hidden_states=context
                )
            else:
                hidden = block(hidden_states=hidden, temb=temb, res_hidden_states_tuple=res)
        last = unet.up_blocks[-1]
        deep = _up_layers(last, hidden, skips, temb, context, range(self.start))
        hidden = _up_layers(last, deep, skips, temb, context, range(self.start, len(last.resnets)))
        return _head(unet, hidden), deep


class UNetShallow(nn.Module):
    """Cheap U-Net step that reuses the cached deep feature."""

    def __init__(self, unet, shallow_layers: int):
        super().__init__()
        self.unet = unet
        self.shallow_layers = shallow_layers

    def forward(self, sample, timestep, encoder_hidden_states, deep_feature, *extra):
        """`extra`: SDXL's pooled embedding and time ids, then the ControlNet residuals of its own skips."""
        unet, context = self.unet, encoder_hidden_states
        (pooled_embedding, time_ids), residuals = _inputs(unet, extra)
        temb = _time_embedding(unet, sample, timestep, context, pooled_embedding, time_ids)
        hidden = unet.conv_in(sample)
        skips = [hidden]
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        for i in range(self.shallow_layers - 1):
            hidden = _layer(first, i, hidden, temb, context)
            skips.append(hidden)
        skips = _controlled(skips, residuals)
        layers = range(len(last.resnets) - self.shallow_layers, len(last.resnets))
        return _head(unet, _up_layers(last, deep_feature, skips, temb, context, layers))
