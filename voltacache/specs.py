"""One spec per component: tensor names, dtypes and static shapes for a (batch, height, width).

The exporter, the engine builder, the Triton config writer and the runtime all read these specs;
a tensor name or shape is written here and nowhere else. `batch` is the number of images. Every
tensor's leading dimension is its rows: ROWS_PER_IMAGE of them per image (the text encoder and
the U-Nets see the classifier-free guidance pair, negative and positive prompt, so 2; the VAE 1).
The ONNX graphs keep that dimension dynamic (named ROWS), so one engine serves several numbers
of images; `ComponentSpec.for_images(n)` gives the static shapes of one call with n images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

# Tensor names.
INPUT_IDS = "input_ids"
TEXT_EMBEDDINGS = "text_embeddings"
POOLED_EMBEDDING = "pooled_embedding"
SAMPLE = "sample"
TIMESTEP = "timestep"
CONTEXT = "encoder_hidden_states"
NOISE_PRED = "noise_pred"
DEEP_FEATURE = "deep_feature"
LATENT = "latent"
IMAGE = "image"
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"

# Component names.
TEXT_ENCODER = "text_encoder"
UNET_DEEP = "unet_deep"
UNET_SHALLOW = "unet_shallow"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
COMPONENTS = (TEXT_ENCODER, UNET_DEEP, UNET_SHALLOW, VAE_DECODER, VAE_ENCODER)

# Rows of every input and output per image: the guidance pair for CLIP and the U-Nets (a timestep
# per row too), one row for the VAE.
ROWS_PER_IMAGE = {TEXT_ENCODER: 2, UNET_DEEP: 2, UNET_SHALLOW: 2, VAE_DECODER: 1, VAE_ENCODER: 1}
ROWS = "rows"  # the name of the dynamic leading dimension in the ONNX graphs


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]

    def zeros(self) -> np.ndarray:
        return np.zeros(self.shape, self.dtype)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def rows_per_image(self) -> int:
        return ROWS_PER_IMAGE[self.name]

    @property
    def images(self) -> int:
        """The number of images these shapes hold."""
        return self.inputs[0].shape[0] // self.rows_per_image

    def for_images(self, n: int) -> ComponentSpec:
        """The same tensors for a call with n images: every leading dimension is n x rows_per_image."""
        rows = n * self.rows_per_image

        def resized(tensors):
            return tuple(replace(t, shape=(rows, *t.shape[1:])) for t in tensors)

        return replace(self, inputs=resized(self.inputs), outputs=resized(self.outputs))

    def to_json(self) -> dict:
        return {"inputs": [asdict(t) for t in self.inputs], "outputs": [asdict(t) for t in self.outputs]}

    @classmethod
    def from_json(cls, name: str, data: dict) -> ComponentSpec:
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        return cls(name, tensors(data["inputs"]), tensors(data["outputs"]))


@dataclass(frozen=True)
class Geometry:
    """What the specs need from a model: channel counts, scales and the DeepCache split."""

    latent_channels: int
    vae_scale: int  # image pixels per latent pixel
    unet_scale: int  # latent pixels per pixel of the U-Net's deepest level
    text_length: int
    text_hidden: int
    vocab_size: int
    deep_channels: int
    shallow_layers: int  # layers of up_blocks[-1] that unet_shallow runs

    @classmethod
    def from_pipeline(cls, pipe, shallow_layers: int) -> Geometry:
        unet, vae, text = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
        n_last = unet.layers_per_block + 1
        return cls(
            latent_channels=unet.in_channels,
            vae_scale=2 ** (len(vae.block_out_channels) - 1),
            unet_scale=2 ** (len(unet.block_out_channels) - 1),
            text_length=text.max_position_embeddings,
            text_hidden=text.hidden_size,
            vocab_size=text.vocab_size,
            # up_blocks[-2] outputs block_out_channels[1]; inside up_blocks[-1] every layer outputs [0]
            deep_channels=unet.block_out_channels[1] if shallow_layers == n_last else unet.block_out_channels[0],
            shallow_layers=shallow_layers,
        )

    @property
    def size_multiple(self) -> int:
        return self.vae_scale * self.unet_scale


def component_specs(g: Geometry, batch: int, height: int, width: int) -> dict[str, ComponentSpec]:
    """The static specs of every component for `batch` images of height x width pixels."""
    m = g.size_multiple
    if height % m or width % m or height <= 0 or width <= 0 or batch < 1:
        raise ValueError(f"size {height}x{width}, batch {batch}: height and width must be positive multiples of {m}")
    # written for one image, then scaled: the rows of each tensor come from ROWS_PER_IMAGE alone
    pair, one = ROWS_PER_IMAGE[UNET_DEEP], ROWS_PER_IMAGE[VAE_DECODER]
    lh, lw = height // g.vae_scale, width // g.vae_scale
    latents = (g.latent_channels, lh, lw)
    sample = TensorSpec(SAMPLE, "float32", (pair, *latents))
    timestep = TensorSpec(TIMESTEP, "float32", (pair,))
    context = TensorSpec(CONTEXT, "float32", (pair, g.text_length, g.text_hidden))
    noise = TensorSpec(NOISE_PRED, "float32", (pair, *latents))
    deep = TensorSpec(DEEP_FEATURE, "float32", (pair, g.deep_channels, lh, lw))
    image = TensorSpec(IMAGE, "float32", (one, 3, height, width))
    latent = TensorSpec(LATENT, "float32", (one, *latents))
    specs = [
        ComponentSpec(
            TEXT_ENCODER,
            (TensorSpec(INPUT_IDS, "int32", (pair, g.text_length)),),
            (
                TensorSpec(TEXT_EMBEDDINGS, "float32", context.shape),
                TensorSpec(POOLED_EMBEDDING, "float32", (pair, g.text_hidden)),
            ),
        ),
        ComponentSpec(UNET_DEEP, (sample, timestep, context), (noise, deep)),
        ComponentSpec(UNET_SHALLOW, (sample, timestep, context, deep), (noise,)),
        ComponentSpec(VAE_DECODER, (latent,), (image,)),
        ComponentSpec(
            VAE_ENCODER,
            (image,),
            (TensorSpec(LATENT_MEAN, "float32", latent.shape), TensorSpec(LATENT_STD, "float32", latent.shape)),
        ),
    ]
    return {s.name: s.for_images(batch) for s in specs}
