"""One spec per component: tensor names, dtypes and static shapes for a (batch, height, width).

The exporter, the engine builder, the Triton config writer and the runtime all read these specs;
a tensor name or shape is written here and nowhere else. `batch` is the number of images. Every
tensor's leading dimension is its rows: ROWS_PER_IMAGE of them per image (the text encoder and
the U-Nets see the classifier-free guidance pair, negative and positive prompt, so 2; the VAE 1).
The ONNX graphs keep that dimension dynamic (named ROWS), so one engine serves several numbers
of images; `ComponentSpec.for_images(n)` gives the static shapes of one call with n images. Two more axes
may be dynamic, each a runtime choice of one prebuilt engine: the U-Nets' prompt context (PROMPT_AXIS, up
to export --max-prompt-chunks), and the height and width of image-shaped tensors (SPATIAL, the sizes of
export --sizes, recorded in a spec's latent_sizes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

# Tensor names.
INPUT_IDS = "input_ids"
INPUT_IDS_2 = "input_ids_2"  # SDXL's second tokenizer (OpenCLIP bigG's text encoder)
TEXT_IDS = (INPUT_IDS, INPUT_IDS_2)  # the text encoder's inputs, one per tokenizer
TEXT_EMBEDDINGS = "text_embeddings"
POOLED_EMBEDDING = "pooled_embedding"
SAMPLE = "sample"
TIMESTEP = "timestep"
CONTEXT = "encoder_hidden_states"
NOISE_PRED = "noise_pred"
DEEP_FEATURE = "deep_feature"
TIME_IDS = "time_ids"  # SDXL's size conditioning: original size, crop top-left, target size
SIZE_CONDITIONS = 6
LATENT = "latent"
IMAGE = "image"
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"
# ControlNet: the control image ([0, 1] RGB at the image's size, a row per U-Net row) and the conditioning scale
# (one per row) in; the residuals added to the U-Net's down-block skips and to its mid block's output out,
# which the U-Nets of an export with ControlNets take as inputs (the shallow U-Net only its own layers')
CONTROL_IMAGE = "control_image"
CONTROL_SCALE = "control_scale"
MID_RESIDUAL = "mid_residual"


def is_residual(name: str) -> bool:
    return name == MID_RESIDUAL or name.startswith("down_residual_")


def residual_names(count: int) -> tuple[str, ...]:
    """The names of `count` ControlNet residuals: the down blocks' skips in order, then the mid block's."""
    return (*(f"down_residual_{i}" for i in range(count - 1)), MID_RESIDUAL) if count else ()


# Component names.
TEXT_ENCODER = "text_encoder"
UNET_DEEP = "unet_deep"
UNET_SHALLOW = "unet_shallow"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
COMPONENTS = (TEXT_ENCODER, UNET_DEEP, UNET_SHALLOW, VAE_DECODER, VAE_ENCODER)
CONTROLNET_PREFIX = "controlnet_"  # each ControlNet of an export is a component of its own: controlnet_NAME


def controlnet_component(name: str) -> str:
    return CONTROLNET_PREFIX + name


def is_controlnet(component: str) -> bool:
    return component.startswith(CONTROLNET_PREFIX)


# Rows of every input and output per image: the guidance pair for CLIP and the U-Nets (a timestep
# per row too), one row for the VAE.
ROWS_PER_IMAGE = {TEXT_ENCODER: 2, UNET_DEEP: 2, UNET_SHALLOW: 2, VAE_DECODER: 1, VAE_ENCODER: 1}
ROWS = "rows"  # the name of the dynamic leading dimension in the ONNX graphs
# A prompt longer than CLIP's context is encoded window by window (voltacache.runtime.tokenizer): the U-Nets'
# context holds text_length tokens per window, along this axis (dynamic in the ONNX graphs, named PROMPT_TOKENS).
PROMPT_AXIS = {CONTEXT: 1}
PROMPT_TOKENS = "prompt_tokens"
# An export for several image sizes (export --sizes) keeps the height and width of every image-shaped tensor
# dynamic (NCHW: axes 2 and 3), named by what they count: latent pixels, or image pixels for the VAE's image.
SPATIAL_AXES = (2, 3)
LATENT_SIDES, IMAGE_SIDES = ("latent_height", "latent_width"), ("image_height", "image_width")
SPATIAL = {
    **{name: LATENT_SIDES for name in (SAMPLE, NOISE_PRED, DEEP_FEATURE, LATENT, LATENT_MEAN, LATENT_STD)},
    IMAGE: IMAGE_SIDES,
    CONTROL_IMAGE: IMAGE_SIDES,
}


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
    # the latent (height, width) sizes an export for several image sizes serves, the spec's own first;
    # () for one size: the spec's shapes alone
    latent_sizes: tuple[tuple[int, int], ...] = ()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def rows_per_image(self) -> int:
        return 2 if is_controlnet(self.name) else ROWS_PER_IMAGE[self.name]  # a ControlNet runs the guidance pair

    @property
    def images(self) -> int:
        """The number of images these shapes hold."""
        return self.inputs[0].shape[0] // self.rows_per_image

    def for_images(self, n: int, chunks: int = 1, latent: tuple[int, int] | None = None) -> ComponentSpec:
        """The same tensors for a call with n images, every leading dimension n x rows_per_image, a prompt
        context of `chunks` chunks (the spec's shape holds one), and latents of `latent` (height, width)
        pixels (None: the spec's own; an image tensor scales with them)."""
        rows, scale = n * self.rows_per_image, self.image_scale
        sides = {LATENT_SIDES: latent, IMAGE_SIDES: latent and (latent[0] * scale, latent[1] * scale)}

        def resized(tensors):
            out = []
            for t in tensors:
                shape = _chunked((rows, *t.shape[1:]), t.name, chunks)
                if latent is not None and t.name in SPATIAL:
                    shape = (*shape[:2], *sides[SPATIAL[t.name]])
                out.append(replace(t, shape=shape))
            return tuple(out)

        return replace(self, inputs=resized(self.inputs), outputs=resized(self.outputs))

    @property
    def latent_size(self) -> tuple[int, int] | None:
        """The (height, width) of the spec's latents (None: a component without image-shaped tensors)."""
        tensors = (*self.inputs, *self.outputs)
        return next((self._latent(t.name, t.shape) for t in tensors if t.name in SPATIAL), None)

    @property
    def served_latents(self) -> tuple[tuple[int, int], ...]:
        """Every latent (height, width) the component runs at."""
        return self.latent_sizes or ((self.latent_size,) if self.latent_size else ())

    @property
    def image_scale(self) -> int:
        """Image pixels per latent pixel, as the spec's own tensors hold them (the VAE's; 1 without both)."""
        shapes = {SPATIAL[t.name]: t.shape[2] for t in (*self.inputs, *self.outputs) if t.name in SPATIAL}
        return shapes[IMAGE_SIDES] // shapes[LATENT_SIDES] if len(shapes) == 2 else 1

    def latent_of(self, feeds: dict) -> tuple[int, int] | None:
        """The latent (height, width) of the first image-shaped input in `feeds` (None: none there)."""
        given = [t for t in self.inputs if t.name in SPATIAL and np.ndim(feeds.get(t.name)) == len(t.shape)]
        return self._latent(given[0].name, feeds[given[0].name].shape) if given else None

    def _latent(self, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """The latent (height, width) an image-shaped tensor of this shape stands for."""
        scale = self.image_scale if name == IMAGE else 1
        return shape[2] // scale, shape[3] // scale

    def chunks(self, feeds: dict) -> int:
        """How many prompt chunks the context in `feeds` holds (1 for a component without one)."""
        for t in self.inputs:
            if t.name in PROMPT_AXIS and t.name in feeds:
                axis = PROMPT_AXIS[t.name]
                tokens = feeds[t.name].shape[axis] if feeds[t.name].ndim > axis else 0
                return max(1, tokens // t.shape[axis]) if tokens % t.shape[axis] == 0 else 1
        return 1

    def to_json(self) -> dict:
        def tensors(items):
            return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in items]

        sizes = {"latent_sizes": [list(size) for size in self.latent_sizes]} if self.latent_sizes else {}
        return {"inputs": tensors(self.inputs), "outputs": tensors(self.outputs), **sizes}

    @classmethod
    def from_json(cls, name: str, data: dict) -> ComponentSpec:
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        sizes = tuple(tuple(size) for size in data.get("latent_sizes", ()))
        return cls(name, tensors(data["inputs"]), tensors(data["outputs"]), sizes)


def _chunked(shape: tuple[int, ...], name: str, chunks: int) -> tuple[int, ...]:
    if name not in PROMPT_AXIS or chunks == 1:
        return shape
    axis = PROMPT_AXIS[name]
    return (*shape[:axis], shape[axis] * chunks, *shape[axis + 1 :])


@dataclass(frozen=True)
class Geometry:
    """What the specs need from a model: channel counts, scales and the DeepCache split."""

    latent_channels: int
    vae_scale: int  # image pixels per latent pixel
    unet_scale: int  # latent pixels per pixel of the U-Net's deepest level
    text_length: int
    text_hidden: int  # the U-Net's context width: the text encoders' hidden states side by side
    vocab_size: int
    deep_channels: int
    shallow_layers: int  # layers of up_blocks[-1] that unet_shallow runs
    text_encoders: int  # 1, or 2 (SDXL: CLIP ViT-L and OpenCLIP bigG), each with its own ids
    pooled_dim: int  # the pooled text embedding: CLIP's pooler output, or SDXL's projected one
    time_ids: int  # the U-Net's added size conditions (SDXL: 6), or 0
    # the U-Net's input channels: the latents, or (inpainting U-Nets) latents, mask and masked-image latents
    sample_channels: int | None = None  # None: latent_channels (manifests written before inpainting)
    # each text encoder's part of text_hidden (SDXL's two); None: manifests written before prompt weighting
    text_widths: tuple[int, ...] | None = None
    # ControlNet residuals the U-Nets take (export --controlnet): (channels, latent pixels per residual pixel) of
    # each down-block skip, then of the mid block's output; () for U-Nets without residual inputs
    control_residuals: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_pipeline(cls, pipe, shallow_layers: int, controlled: bool = False) -> Geometry:
        unet, vae = pipe.unet.config, pipe.vae.config
        encoders = [e.config for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
        text = encoders[0]
        n_last = unet.layers_per_block + 1
        return cls(
            latent_channels=unet.out_channels,
            vae_scale=2 ** (len(vae.block_out_channels) - 1),
            unet_scale=2 ** (len(unet.block_out_channels) - 1),
            text_length=text.max_position_embeddings,
            text_hidden=sum(e.hidden_size for e in encoders),
            vocab_size=text.vocab_size,
            # up_blocks[-2] outputs block_out_channels[1]; inside up_blocks[-1] every layer outputs [0]
            deep_channels=unet.block_out_channels[1] if shallow_layers == n_last else unet.block_out_channels[0],
            shallow_layers=shallow_layers,
            text_encoders=len(encoders),
            # diffusers' SDXL pools with the last encoder's projection; SD 1.x/2.x's pooler output is unprojected
            pooled_dim=encoders[-1].projection_dim if len(encoders) > 1 else text.hidden_size,
            time_ids=SIZE_CONDITIONS if unet.addition_embed_type == "text_time" else 0,
            sample_channels=unet.in_channels,
            text_widths=tuple(e.hidden_size for e in encoders),
            control_residuals=residual_layout(unet) if controlled else (),
        )

    @classmethod
    def from_json(cls, data: dict) -> Geometry:
        widths, residuals = data.get("text_widths"), data.get("control_residuals", ())
        return cls(
            **{
                **data,
                "text_widths": tuple(widths) if widths is not None else None,
                "control_residuals": tuple(tuple(r) for r in residuals),
            }
        )

    def to_json(self) -> dict:
        data = asdict(self)
        widths = list(self.text_widths) if self.text_widths is not None else None
        return {**data, "text_widths": widths, "control_residuals": [list(r) for r in self.control_residuals]}

    @property
    def controlled(self) -> bool:
        """U-Nets that take ControlNet residuals (an export with ControlNets)."""
        return bool(self.control_residuals)

    @property
    def unet_channels(self) -> int:
        """The U-Net sample's channels."""
        return self.sample_channels or self.latent_channels

    @property
    def inpainting(self) -> bool:
        """A U-Net that reads the mask and the masked image's latents beside the latents (SD 1.5 inpainting's 9)."""
        return self.unet_channels == 2 * self.latent_channels + 1

    @property
    def size_multiple(self) -> int:
        return self.vae_scale * self.unet_scale


def residual_layout(unet_config) -> tuple[tuple[int, int], ...]:
    """(channels, latent pixels per residual pixel) of a U-Net's down-block skips, conv_in's first, then of its
    mid block: what a ControlNet adds to (diffusers' down_block_additional_residuals, mid_block_additional_residual)."""
    channels = unet_config.block_out_channels
    layers = unet_config.layers_per_block
    layers = layers if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    found, scale = [(channels[0], 1)], 1
    for i, (width, n) in enumerate(zip(channels, layers)):
        found += [(width, scale)] * n
        if i < len(channels) - 1:  # the downsampler's output is a skip too
            scale *= 2
            found.append((width, scale))
    return (*found, (channels[-1], scale))


def component_specs(
    g: Geometry,
    batch: int,
    height: int,
    width: int,
    sizes: tuple[tuple[int, int], ...] = (),
    controlnets: tuple[str, ...] = (),
) -> dict[str, ComponentSpec]:
    """The static specs of every component for `batch` images of height x width pixels; with `sizes`, the
    (height, width) pixel sizes an export serves (height x width among them), recorded as latent_sizes;
    `controlnets`: the names of the export's ControlNets, a component each (controlnet_NAME)."""
    m = g.size_multiple
    for h, w in ((height, width), *sizes):
        if h % m or w % m or h <= 0 or w <= 0 or batch < 1:
            raise ValueError(f"size {w}x{h}, batch {batch}: height and width must be positive multiples of {m}")
    served = tuple((h // g.vae_scale, w // g.vae_scale) for h, w in sizes) if len(sizes) > 1 else ()
    # written for one image, then scaled: the rows of each tensor come from ROWS_PER_IMAGE alone
    pair, one = ROWS_PER_IMAGE[UNET_DEEP], ROWS_PER_IMAGE[VAE_DECODER]
    lh, lw = height // g.vae_scale, width // g.vae_scale
    latents = (g.latent_channels, lh, lw)
    sample = TensorSpec(SAMPLE, "float32", (pair, g.unet_channels, lh, lw))
    timestep = TensorSpec(TIMESTEP, "float32", (pair,))
    context = TensorSpec(CONTEXT, "float32", (pair, g.text_length, g.text_hidden))
    noise = TensorSpec(NOISE_PRED, "float32", (pair, *latents))
    deep = TensorSpec(DEEP_FEATURE, "float32", (pair, g.deep_channels, lh, lw))
    pooled = TensorSpec(POOLED_EMBEDDING, "float32", (pair, g.pooled_dim))
    # SDXL's added conditions: the pooled text embedding and the size conditioning, per row
    conditions = (pooled, TensorSpec(TIME_IDS, "float32", (pair, g.time_ids))) if g.time_ids else ()
    image = TensorSpec(IMAGE, "float32", (one, 3, height, width))
    latent = TensorSpec(LATENT, "float32", (one, *latents))
    residuals = tuple(
        TensorSpec(name, "float32", (pair, channels, lh // scale, lw // scale))
        for name, (channels, scale) in zip(residual_names(len(g.control_residuals)), g.control_residuals)
    )
    # the shallow U-Net's skips are conv_in's and its first shallow_layers - 1 layers' (compile.unet_split)
    shallow_residuals = residuals[: g.shallow_layers]
    control = (
        TensorSpec(SAMPLE, "float32", (pair, g.latent_channels, lh, lw)),  # the latents alone, inpainting or not
        timestep,
        context,
        *conditions,
        TensorSpec(CONTROL_IMAGE, "float32", (pair, 3, height, width)),
        TensorSpec(CONTROL_SCALE, "float32", (pair,)),
    )
    specs = [
        ComponentSpec(
            TEXT_ENCODER,
            tuple(TensorSpec(name, "int32", (pair, g.text_length)) for name in TEXT_IDS[: g.text_encoders]),
            (TensorSpec(TEXT_EMBEDDINGS, "float32", context.shape), pooled),
        ),
        ComponentSpec(UNET_DEEP, (sample, timestep, context, *conditions, *residuals), (noise, deep)),
        ComponentSpec(UNET_SHALLOW, (sample, timestep, context, deep, *conditions, *shallow_residuals), (noise,)),
        ComponentSpec(VAE_DECODER, (latent,), (image,)),
        ComponentSpec(
            VAE_ENCODER,
            (image,),
            (TensorSpec(LATENT_MEAN, "float32", latent.shape), TensorSpec(LATENT_STD, "float32", latent.shape)),
        ),
        *(ComponentSpec(controlnet_component(name), control, residuals) for name in controlnets),
    ]
    return {s.name: replace(s, latent_sizes=served if s.latent_size else ()).for_images(batch) for s in specs}
