"""INT8 U-Nets and VAE decoder: calibrated on real denoising trajectories, quantized to QDQ ONNX by ONNX
Runtime's tools.

Why ONNX Runtime's `quantize_static` and not NVIDIA ModelOpt: it runs here (ModelOpt's ONNX path
needs its CUDA build for calibration at SD sizes), it writes standard QuantizeLinear /
DequantizeLinear pairs, which ONNX Runtime's CPU provider fuses into int8 kernels (VNNI) and
TensorRT and OpenVINO build as explicitly quantized engines without a calibrator, and it measured 4.5x
on SD 1.5's hot convolutions here (docs/platform.md).

Activation ranges move with the timestep, so the calibration set is what the U-Net sees while it
denoises: the DDIM trajectories of a few prompts, every step, both halves of the guidance pair. The VAE
decoder is calibrated on what it decodes: each run's final latent, and the clean latent the scheduler
predicts three steps before the end (a second, slightly different sample of the same distribution).
Weights are int8 per output channel (symmetric), activations uint8 per tensor (MinMax). Only Conv,
MatMul and Gemm are quantized: normalizations, softmax inside the fused Attention node and the
elementwise ops stay fp32. Each graph's first and last convolutions stay fp32 as well (the U-Net's
conv_in reads the noisy latent and its conv_out writes the noise prediction; the decoder's first reads
the latent, its last writes the image): measured on the shapes model (56 captions), 39.1 dB against
fp32 with the U-Net's kept, 38.7 dB with them quantized, the same adherence; they are under 1% of the
FLOPs, so keeping them costs nothing measurable (docs/benchmarks.md). An export with ControlNets calibrates
the U-Nets on trajectories with and without their residuals; the residual inputs stay fp32 (only Conv, MatMul
and Gemm are quantized) and the ControlNets themselves are not quantized.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..specs import (
    CONTEXT,
    CONTROL_IMAGE,
    CONTROL_SCALE,
    DEEP_FEATURE,
    IMAGE,
    INPUT_IDS,
    LATENT,
    NOISE_PRED,
    SAMPLE,
    TEXT_EMBEDDINGS,
    TIMESTEP,
    UNET_DEEP,
    UNET_SHALLOW,
    VAE_DECODER,
    is_controlnet,
    is_residual,
)
from .options import Calibration

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# each graph's outer convolutions, by the graph input the first reads and the output the last writes
OUTER = {UNET_DEEP: (SAMPLE, NOISE_PRED), UNET_SHALLOW: (SAMPLE, NOISE_PRED), VAE_DECODER: (LATENT, IMAGE)}


def trajectories(pipe, modules: dict, specs: dict, calibration: Calibration) -> dict[str, list[dict]]:
    """The feeds of unet_deep and unet_shallow at every step of DDIM runs of the calibration prompts
    (PyTorch fp32, the reference the ONNX graphs reproduce): what the U-Nets see when they denoise; and
    of the VAE decoder, the latents those runs decode."""
    import torch

    from ..request import Request
    from ..runtime.tokenizer import ClipTokenizer
    from ..schedulers import make_scheduler
    from ..specs import TEXT_ENCODER
    from .graphs import run_torch

    deep_spec = specs[UNET_DEEP]
    batch = deep_spec.images
    latent_shape = (batch, *deep_spec.inputs[0].shape[1:])
    deep_feeds, shallow_feeds, decoder_feeds = [], [], []
    # an export with ControlNets: every other trajectory steered by one of them (the residuals widen the ranges
    # of the skips' convolutions), the rest with zero residuals, as a request without ControlNet runs
    controlnets = [name for name in specs if is_controlnet(name)]
    residuals = [t for t in deep_spec.inputs if is_residual(t.name)]
    shallow_residuals = {t.name for t in specs[UNET_SHALLOW].inputs if is_residual(t.name)}
    scaling = pipe.vae.config.scaling_factor
    tokenize = ClipTokenizer.from_transformers(pipe.tokenizer)
    for index, prompt in enumerate(calibration.prompts):
        ids = tokenize(Request(prompt).texts(batch))
        context = run_torch(modules[TEXT_ENCODER], specs[TEXT_ENCODER], {INPUT_IDS: ids})[TEXT_EMBEDDINGS]
        scheduler = make_scheduler(calibration.scheduler, dict(pipe.scheduler.config), calibration.steps)
        scheduler.set_timesteps(calibration.steps)
        generator = torch.Generator("cpu").manual_seed(calibration.seed + index)
        latents = torch.randn(latent_shape, generator=generator) * scheduler.init_noise_sigma
        for position, t in enumerate(scheduler.timesteps):
            sample = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            timestep = np.full(len(sample), float(t), np.float32)  # one per row, as the graphs take it
            feeds = {SAMPLE: sample.numpy(), TIMESTEP: timestep, CONTEXT: context}
            steered = controlnets[(index // 2) % len(controlnets)] if controlnets and index % 2 else None
            if residuals:
                feeds |= control_residuals(modules, specs, steered, feeds, residuals)
            out = run_torch(modules[UNET_DEEP], deep_spec, feeds)
            deep_feeds.append(feeds)
            shallow = {k: v for k, v in feeds.items() if not is_residual(k) or k in shallow_residuals}
            shallow_feeds.append({**shallow, DEEP_FEATURE: out[DEEP_FEATURE]})
            uncond, cond = torch.from_numpy(out[NOISE_PRED]).chunk(2)
            noise = uncond + calibration.guidance * (cond - uncond)
            step = scheduler.step(noise, t, latents, eta=0.0)
            latents = step.prev_sample
            if position == len(scheduler.timesteps) - 3 and getattr(step, "pred_original_sample", None) is not None:
                decoder_feeds.append({LATENT: (step.pred_original_sample / scaling).numpy()})
        decoder_feeds.append({LATENT: (latents / scaling).numpy()})
    return {UNET_DEEP: deep_feeds, UNET_SHALLOW: shallow_feeds, VAE_DECODER: decoder_feeds}


def control_residuals(modules: dict, specs: dict, controlnet: str | None, feeds: dict, residuals: list) -> dict:
    """The U-Net's residual inputs for one calibration step: `controlnet`'s on a synthetic control image (the
    Canny edges of a drawn scene, scale 1), or zeros."""
    from .graphs import run_torch

    rows = len(feeds[SAMPLE])
    if controlnet is None:
        return {t.name: np.zeros((rows, *t.shape[1:]), t.dtype) for t in residuals}
    spec = specs[controlnet]
    height, width = next(t.shape[2:] for t in spec.inputs if t.name == CONTROL_IMAGE)
    image = np.repeat(calibration_control_image(height, width)[None], rows, axis=0)
    inputs = {**feeds, CONTROL_IMAGE: image, CONTROL_SCALE: np.ones(rows, np.float32)}
    return run_torch(modules[controlnet], spec, inputs)


def calibration_control_image(height: int, width: int) -> np.ndarray:
    """[0, 1] CHW: white edges on black, as a Canny ControlNet's input (a ControlNet of another kind still gets
    residuals of the magnitude it makes)."""
    from PIL import Image, ImageDraw

    from ..images import canny

    scene = Image.new("RGB", (width, height), (40, 60, 90))
    draw = ImageDraw.Draw(scene)
    draw.rectangle([width // 4, height // 3, width // 2, height - 4], fill=(220, 220, 210))
    draw.ellipse([width // 2, height // 8, width - 4, height // 2], fill=(240, 200, 60))
    return (canny(np.asarray(scene)).astype(np.float32) / 255.0).transpose(2, 0, 1)


def outer_convolutions(model, component: str) -> dict[str, str]:
    """The names of conv_in (the Conv reading the graph's input: the U-Net's `sample`, the decoder's
    `latent`) and conv_out (the Conv writing its output: `noise_pred`, `image`), found by where they
    sit in the graph, not by the exporter's node names."""
    first, last = OUTER[component]
    found = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        if node.input[0] == first:
            found["conv_in"] = node.name
        if last in node.output:
            found["conv_out"] = node.name
    return found


class FeedReader:
    """ONNX Runtime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):  # not needed by MinMax: one pass
        pass


def quantize_graph(component: str, source: Path, target: Path, feeds: list[dict], calibration: Calibration) -> dict:
    """Write the QDQ int8 graph of the fp32 component at `source` to `target`; returns what was kept
    fp32 and the counts of quantized nodes."""
    import onnx

    graph = onnx.load(str(source), load_external_data=False)
    outer = outer_convolutions(graph, component)
    excluded = [outer[name] for name in calibration.keep_fp32 if name in outer]
    external = source.with_name(source.name + ".data").exists()  # a graph over 2 GB: so is its working copy
    logging.disable(logging.WARNING)  # its advice to pre-process goes to the root logger on every call
    try:
        _quantize(source, target, feeds, excluded, external)
    finally:
        logging.disable(logging.NOTSET)
    quantized = onnx.load(str(target), load_external_data=False)
    return {
        "kept_fp32": {name: outer[name] for name in calibration.keep_fp32 if name in outer},
        "quantize_linear_nodes": sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node),
        "dequantize_linear_nodes": sum(n.op_type == "DequantizeLinear" for n in quantized.graph.node),
    }


def _quantize(source: Path, target: Path, feeds: list[dict], excluded: list[str], external: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(source),
        str(target),
        FeedReader(feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS),
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        nodes_to_exclude=excluded,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=external,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )


def quantize_components(pipe, modules: dict, specs: dict, out_dir: Path, calibration: Calibration, progress=None):
    """Replace the fp32 graphs in `out_dir` of the components the calibration quantizes (the U-Nets, the
    VAE decoder) by their int8 QDQ graphs; returns each one's manifest additions: what stayed fp32, the
    QDQ counts, the error against fp32 on a calibration sample, and the TensorRT lint of the graph."""
    import onnx

    from .graphs import max_error, release_memory, run_onnx, save_model
    from .trt_lint import lint

    samples = trajectories(pipe, modules, specs, calibration)
    entries = {}
    for name in calibration.quantized:
        feeds = samples[name]
        if progress:
            progress(name, "quantize")
        path = out_dir / f"{name}.onnx"
        staging = out_dir / f"{name}.int8-staging.onnx"
        info = quantize_graph(name, path, staging, feeds, calibration)
        # the middle of the set (for the U-Nets, of the schedule, where the image forms): int8 against fp32
        probe = feeds[len(feeds) // 2]
        reference, quantized = run_onnx(path, probe), run_onnx(staging, probe)
        release_memory()
        for old in (path, path.with_name(path.name + ".data")):
            old.unlink(missing_ok=True)
        save_model(onnx.load(str(staging)), path)  # weights inside the file unless it is over 2 GB
        for temporary in (staging, staging.with_name(staging.name + ".data")):
            temporary.unlink(missing_ok=True)
        report = lint(path)
        entries[name] = {
            **info,
            "int8_error": max_error(quantized, reference),
            "tensorrt_lint": {"target": report.tensorrt, "ok": report.ok, "problems": report.problems},
        }
    return entries
