"""Export every component to ONNX, validate it against PyTorch, lint it for TensorRT, write manifest.json.

Recipe measured on these machines (docs/platform.md): `torch.onnx.export(dynamo=True)`, traced at
`batch` images with the leading (row) dimension of every input and output left dynamic, so one
graph serves every size in `batch_sizes` (a server runs many requests' U-Net steps in one call);
opset 23 turns each scaled_dot_product_attention into one ONNX `Attention` node, opset 18 leaves
MatMul/Softmax/MatMul for TensorRT < 10.14 to fuse; FP16 through onnxruntime's
`OnnxModel.convert_float_to_float16(keep_io_types=True)` (graph inputs and outputs stay fp32, so
every runtime binds the same float32 buffers whatever the precision).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import ExportError
from ..outputs import EXPORT, refuse_overlap, staged_output
from ..pipeline.lora import LORA_COMPONENTS, export_targets
from ..runtime.manifests import EXPORT_FORMAT, MANIFEST, ExportManifest
from ..runtime.tokenizer import TOKENIZER_DIRS
from ..specs import (
    CONTEXT,
    DEEP_FEATURE,
    NOISE_PRED,
    POOLED_EMBEDDING,
    PROMPT_AXIS,
    PROMPT_TOKENS,
    ROWS,
    SAMPLE,
    SPATIAL,
    SPATIAL_AXES,
    TEXT_IDS,
    TIME_IDS,
    TIMESTEP,
    UNET_DEEP,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
    ComponentSpec,
    Geometry,
    component_specs,
    controlnet_component,
    residual_names,
)
from .components import torch_modules
from .graphs import EXTERNAL_DATA_BYTES, max_error, ort_session, release_memory, run_onnx, run_torch, save_model
from .options import ExportOptions
from .single_file import model_family
from .trt_lint import lint
from .unet_split import shallow_layer_count

# Max abs error against PyTorch fp32, relative to max(1, max |reference|). Measured: fp32 ~1e-6;
# fp16 ~3e-3 on random weights, whose activations are wider than a trained model's.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}
PROBE_CHUNK = 400  # protobuf's 2 GB limit, with room for the graph itself


def model_fingerprint(path: Path) -> str:
    """sha256 over the checkpoint's weight files (names and bytes), so a new model never matches an old one."""
    path = Path(path)
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in {".safetensors", ".bin", ".ckpt", ".pt"})
        if path.is_dir()
        else [path]
    )
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def random_inputs(spec: ComponentSpec, geometry: Geometry, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Validation inputs: token ids framed by CLIP's start/end tokens, a timestep in [0, 1000), image sides for
    SDXL's time ids, N(0, 1) elsewhere."""
    feeds = {}
    for t in spec.inputs:
        if t.name in TEXT_IDS:
            ids = rng.integers(0, geometry.vocab_size - 2, t.shape)
            ids[:, 0], ids[:, -1] = geometry.vocab_size - 2, geometry.vocab_size - 1
            feeds[t.name] = ids.astype(t.dtype)
        elif t.name in (TIMESTEP, TIME_IDS):
            feeds[t.name] = rng.integers(0, 1000, t.shape).astype(t.dtype)
        else:
            feeds[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
    return feeds


def trace_latent(geometry: Geometry, latent: tuple[int, int]) -> tuple[int, int]:
    """The latent size a graph of several sizes is traced at: the default's, each side at least two pixels at
    the U-Net's deepest level."""
    return tuple(max(side, 2 * geometry.unet_scale) for side in latent)


def validation_feeds(modules, specs: dict, geometry: Geometry, rng, latent=None) -> dict[str, dict]:
    """Random inputs of every component (at `latent`, or its spec's size), the shallow U-Net's deep feature the
    deep U-Net's of the same step, as the pipeline runs them."""
    at = {name: spec.for_images(spec.images, 1, latent) for name, spec in specs.items()}
    feeds = {name: random_inputs(spec, geometry, rng) for name, spec in at.items()}
    deep = run_torch(modules[UNET_DEEP], at[UNET_DEEP], feeds[UNET_DEEP])[DEEP_FEATURE]
    feeds[UNET_SHALLOW] = {**feeds[UNET_DEEP], DEEP_FEATURE: deep}
    return feeds


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    return sum(n.op_type == op_type for n in nodes)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The dynamo exporter writes complete value_info, which the converter reads its types from;
    # its own shape inference would fail on graphs over 2 GB.
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    del converted.graph.value_info[:]  # now stale (fp32 types on fp16 tensors)
    # An fp16 initializer shared by several fp32-only nodes (Resize scales) gets one identical
    # Cast per user, all with the same name and output: keep one. The converter also appends the
    # input casts at the end of the graph; TensorRT's parser wants nodes in topological order.
    unique = {(n.name, tuple(n.output)): n for n in reversed(converted.graph.node)}
    nodes = toposort(list(reversed(unique.values())), converted.graph)
    del converted.graph.node[:]
    converted.graph.node.extend(nodes)
    return converted


def toposort(nodes: list, graph) -> list:
    """Nodes in an order where every input is produced before it is used (stable for sorted graphs)."""
    ready = {"", *(i.name for i in graph.input), *(i.name for i in graph.initializer)}
    ordered, pending = [], nodes
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ExportError(f"graph has a cycle or a missing input at {waiting[0].name}")
        pending = waiting
    return ordered


def fp16_overflows(path: Path, feeds: dict) -> list[str]:
    """Tensors that are not finite on `feeds`, with every fp16 intermediate made a graph output.

    `path` holds its weights as external data, so only the graph is loaded here; the probe graph
    is written beside it and ONNX Runtime reads the weights from the same file.
    """
    graph = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(graph)
    probes = [v for v in inferred.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16]
    outputs = {o.name for o in inferred.graph.output}
    inferred.graph.output.extend(v for v in probes if v.name not in outputs)
    probe = path.with_name("probe." + path.name)
    onnx.save_model(inferred, str(probe))
    session = ort_session(probe)
    names = [o.name for o in session.get_outputs()]
    bad = []
    for start in range(0, len(names), PROBE_CHUNK):  # a chunk at a time: all of SD 1.5's activations are GBs
        chunk = names[start : start + PROBE_CHUNK]
        bad += [n for n, v in zip(chunk, session.run(chunk, feeds)) if not np.isfinite(v).all()]
    return bad


# Every component is traced first (stage 1, with the PyTorch model in memory), then converted, checked and
# linted (stages 2-4, with the PyTorch model freed): the full SDXL U-Net fits this way (docs/benchmarks.md).
STAGES = ("export", "precision", "validate", "lint", "quantize")


def trace_component(
    module,
    spec,
    feeds: dict,
    path: Path,
    opset: int,
    external: bool = False,
    step=None,
    lora_targets=None,
    prompt_chunks: int = 1,
    spatial: bool = False,
) -> dict:
    """Stage 1, in PyTorch: the module traced to an fp32 ONNX graph at `path` (its weights as external data
    beside it when `external` or over protobuf's limit), and PyTorch's outputs on `feeds`: the reference the
    graph is checked against once the PyTorch model is gone. `lora_targets`, a dict: filled with where
    the weights a LoRA changes lie in the graph (voltacache.pipeline.lora.export_targets). `prompt_chunks`
    above 1: the context's prompt axis stays dynamic too (specs.PROMPT_AXIS); `spatial`: the height and width of
    every image-shaped tensor too (specs.SPATIAL: an export for several sizes)."""
    (step or (lambda stage: None))("export")
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            # DYNAMIC, not a named Dim: torch.export refuses a named Dim traced at size 1 (one VAE row)
            dynamic_shapes=signature_shaped(
                module, [dynamic_axes(n, prompt_chunks, spatial) for n in spec.input_names]
            ),
            verbose=False,
        )
    name_axes(program, path, prompt_chunks, spatial)
    if lora_targets is not None:
        lora_targets.update(export_targets(module, program))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    program.save(str(path), external_data=external or _weight_bytes(program) > EXTERNAL_DATA_BYTES)
    del program
    release_memory()
    return run_torch(module, spec, feeds)


def finish_component(
    spec, feeds: dict, reference: dict, traced: Path, path: Path, precision: str, step=None, at_sizes=()
):
    """Stages 2-4, without PyTorch: convert the traced fp32 graph to `precision` at `path` (fp32: `traced`
    is `path`), check it against PyTorch's outputs (on `feeds`, and on each (feeds, outputs) of `at_sizes`:
    the other sizes an export serves), lint it. Returns the manifest entry and ONNX Runtime's outputs on
    `feeds`. Each stage goes through disk: protobuf keeps replaced weights in its arena until the whole
    message dies, so a model is dropped as soon as its file is written."""
    step = step or (lambda stage: None)
    step("precision")
    overflows = []
    if precision == "fp16":
        fp16 = traced.with_name("fp16.onnx")
        model = to_fp16(onnx.load(str(traced)))
        onnx.save_model(model, str(fp16), save_as_external_data=True, location="fp16.onnx.data")
        del model
        release_memory()
        overflows = fp16_overflows(fp16, feeds)
        save_model(onnx.load(str(fp16)), path)
        release_memory()
    step("validate")
    outputs = run_onnx(path, feeds)
    error = max([max_error(outputs, reference), *(max_error(run_onnx(path, f), r) for f, r in at_sizes)])
    graph = onnx.load(str(path), load_external_data=False)
    entry = {
        "file": path.name,
        **spec.to_json(),
        "precision": precision,
        "max_error": error,
        "tolerance": TOLERANCE[precision],
        "attention_nodes": count_ops(graph, "Attention"),
        "fp16_overflows": overflows,
    }
    if overflows:
        raise ExportError(
            f"{path.name}: fp16 overflow in {len(overflows)} tensor(s), first {overflows[:3]}; export fp32"
        )
    if not error <= TOLERANCE[precision]:
        raise ExportError(
            f"{path.name}: ONNX Runtime differs from PyTorch by {error:.3g} (tolerance {TOLERANCE[precision]})"
        )
    step("lint")
    report = lint(path)
    entry["tensorrt_lint"] = {"target": report.tensorrt, "ok": report.ok, "problems": report.problems}
    step("done")
    return entry, outputs


def signature_shaped(module, axes: list) -> tuple:
    """The inputs' dynamic axes in the structure of the module's forward: torch.export sees the inputs past its
    named parameters (`*extra`: SDXL's conditions, ControlNet residuals) as one tuple."""
    params = inspect.signature(module.forward).parameters.values()
    named = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
    if not any(p.kind == p.VAR_POSITIONAL for p in params) or len(axes) == named:
        return tuple(axes)
    return (*axes[:named], tuple(axes[named:]))


def dynamic_axes(name: str, prompt_chunks: int, spatial: bool = False) -> dict:
    """The dynamic axes of an input: its rows, a context's prompt tokens when prompts span chunks, and an
    image-shaped tensor's height and width when the export serves several sizes."""
    axes = {0: torch.export.Dim.DYNAMIC}
    if name in PROMPT_AXIS and prompt_chunks > 1:
        axes[PROMPT_AXIS[name]] = torch.export.Dim.DYNAMIC
    if name in SPATIAL and spatial:
        axes |= dict.fromkeys(SPATIAL_AXES, torch.export.Dim.DYNAMIC)
    return axes


def name_axes(program, path: Path, prompt_chunks: int = 1, spatial: bool = False) -> None:
    """Name the exporter's symbols for the leading dimension ROWS, a context's PROMPT_TOKENS and the inputs'
    spatial sides (specs.SPATIAL), and refuse a graph where one came out fixed. (An output's side the graph
    computes, such as the decoded image's, keeps the exporter's expression.)"""
    values = [*program.model.graph.inputs, *program.model.graph.outputs]
    program.rename_axes({v.shape[0].value: ROWS for v in values if not isinstance(v.shape[0], int)})
    fixed = [v.name for v in values if v.shape[0] != ROWS]
    named = {}
    if prompt_chunks > 1:
        named |= {(name, axis): PROMPT_TOKENS for name, axis in PROMPT_AXIS.items()}
    if spatial:
        named |= {(name, axis): side for name, sides in SPATIAL.items() for axis, side in zip(SPATIAL_AXES, sides)}
    inputs = [(v, axis, name) for v in program.model.graph.inputs for (n, axis), name in named.items() if n == v.name]
    program.rename_axes({v.shape[axis].value: name for v, axis, name in inputs if not isinstance(v.shape[axis], int)})
    fixed += [f"{v.name}[{axis}]" for v, axis, name in inputs if v.shape[axis] != name]
    if fixed:
        raise ExportError(
            f"{path.name}: the exporter fixed a dynamic dimension of {', '.join(fixed)}; it must stay dynamic"
        )


def _weight_bytes(program) -> int:
    """Bytes of the weights the graph really uses (the shallow U-Net holds the whole U-Net's parameters)."""
    return sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)


def export_model(
    model_path: Path,
    out_dir: Path,
    options: ExportOptions,
    allow_pickle=False,
    config=None,
    progress=None,
    force: bool = False,
) -> ExportManifest:
    """Export all components of the checkpoint at `model_path` into `out_dir`; returns the manifest.

    `progress(component, stage)` is called as each component enters each of STAGES. Everything is
    written into a temporary sibling of `out_dir`, renamed into place once the export succeeded; an
    earlier export there is replaced only with `force`, anything else there is refused.
    """
    options.check()
    refuse_overlap(out_dir, model_path, "--out", "--model")
    with staged_output(out_dir, EXPORT, force=force, arg="--out") as stage:
        return _export(Path(model_path), stage, options, allow_pickle, config, progress)


def _export(model_path: Path, out_dir: Path, options: ExportOptions, allow_pickle, config, progress) -> dict:
    from .checkpoint import load_pipeline

    started = time.time()
    pipe = load_pipeline(model_path, allow_pickle=allow_pickle, config=config)
    weights = model_fingerprint(model_path)
    try:
        shallow = shallow_layer_count(pipe.unet, options.deepcache_branch)
    except ValueError as e:
        raise ExportError(f"--deepcache-branch: {e}") from e
    from .controlnets import load_controlnet

    controlnets = {
        name: load_controlnet(name, path, pipe.unet.config, allow_pickle) for name, path in options.controlnets
    }
    geometry = Geometry.from_pipeline(pipe, shallow, controlled=bool(controlnets))
    if options.precision == "int8" and geometry.time_ids:
        raise ExportError("--precision int8: calibrated for SD 1.x/2.x U-Nets only so far; export SDXL in fp16 or fp32")
    if geometry.unet_channels not in (geometry.latent_channels, 2 * geometry.latent_channels + 1):
        raise ExportError(
            f"{model_path}: a U-Net with {geometry.unet_channels} input channels over {geometry.latent_channels} "
            "latent channels; voltacache serves ordinary U-Nets and inpainting ones (latents, mask, masked image)"
        )
    if options.precision == "int8" and geometry.inpainting:
        raise ExportError(
            "--precision int8: calibrated on text-to-image runs; export an inpainting model in fp16 or fp32"
        )
    native = pipe.unet.config.sample_size * geometry.vae_scale
    height, width = options.height or native, options.width or native
    try:
        specs = component_specs(geometry, options.batch, height, width, options.sizes, tuple(controlnets))
    except ValueError as e:
        raise ExportError(str(e)) from e
    spatial = len(options.sizes) > 1
    modules = torch_modules(pipe, shallow, controlnets)
    components = tuple(specs)  # the model's, then one per ControlNet
    rng = np.random.default_rng(options.seed)
    # Several sizes: traced where no level of the U-Net is a single pixel (torch.export fixes a side it traces
    # at 1), then checked at every size served
    traced_at = trace_latent(geometry, specs[UNET_DEEP].latent_size) if spatial else None
    feeds = validation_feeds(modules, specs, geometry, rng, traced_at)
    others = [latent for latent in specs[UNET_DEEP].latent_sizes if latent != traced_at]
    checks = {latent: validation_feeds(modules, specs, geometry, rng, latent) for latent in others}
    graphs = dataclasses.replace(options, precision=options.graph_precision, calibration=None)
    precisions = {name: component_precision(pipe, name, graphs.precision) for name in components}
    steps = {name: functools.partial(progress, name) if progress else None for name in components}
    model = model_facts(pipe)
    _copy_tokenizer(pipe, out_dir)

    # beside the output, in the export's staging folder: removed with it if the export fails
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        # 1. PyTorch: every graph traced (fp32) and every reference computed, then the PyTorch model freed
        traced, references = {}, {}
        lora_targets = {name: {} for name in LORA_COMPONENTS}
        for name in components:
            final = precisions[name] == "fp32"
            traced[name] = out_dir / f"{name}.onnx" if final else Path(scratch) / name / "fp32.onnx"
            references[name] = trace_component(
                modules[name],
                specs[name],
                feeds[name],
                traced[name],
                graphs.opset,
                not final,
                steps[name],
                lora_targets=lora_targets.get(name),
                prompt_chunks=options.max_prompt_chunks,
                spatial=spatial,
            )
        at_sizes = {
            name: [(check[name], run_torch(modules[name], specs[name], check[name])) for check in checks.values()]
            for name in components
            if specs[name].latent_size is not None
        }
        unsplit = unsplit_outputs(modules, pipe.unet, feeds[UNET_DEEP], geometry)
        if options.precision != "int8":  # int8 calibrates on the PyTorch pipeline below
            del pipe, modules
            release_memory()

        # 2-4. ONNX: precision, validation against PyTorch's outputs, TensorRT lint
        entries, outputs = {}, {}
        for name in components:
            out = out_dir / f"{name}.onnx"
            entries[name], outputs[name] = finish_component(
                specs[name],
                feeds[name],
                references[name],
                traced[name],
                out,
                precisions[name],
                steps[name],
                at_sizes.get(name, ()),
            )
            shutil.rmtree(Path(scratch) / name, ignore_errors=True)  # the fp32 trace: GBs for a U-Net
            if name in lora_targets and options.precision != "int8":  # int8: LoRA would need requantizing
                entries[name]["lora_targets"] = lora_targets[name]
    # what a cache entry of a controlled image is scoped by (and, int8, what the U-Nets were calibrated with)
    controlnet_weights = [model_fingerprint(path) for _, path in options.controlnets]
    for (name, path), fingerprint in zip(options.controlnets, controlnet_weights):
        entries[controlnet_component(name)] |= {"source": str(path), "weights_fingerprint": fingerprint}
    for name, errors in split_errors(unsplit, out_dir, feeds[UNET_DEEP], outputs[UNET_DEEP]).items():
        entries[name]["unsplit_error"] = errors
        if errors["torch"] != 0.0 or not errors["onnx"] <= TOLERANCE[graphs.precision]:
            raise ExportError(f"{name} does not reproduce the unsplit U-Net: {errors}")
    if options.precision == "int8":
        from .quantize import quantize_components

        for name, entry in quantize_components(pipe, modules, specs, out_dir, options.calibration, progress).items():
            entries[name].update(entry, precision="int8")

    data = {
        "format": EXPORT_FORMAT,
        "source": str(model_path),
        **model,
        "model_fingerprint": weights,
        "fingerprint": options.fingerprint(calibrated_on(weights, options.precision, controlnet_weights)),
        "precision": options.precision,
        "calibration": options.calibration.to_json() if options.calibration else None,
        "opset": options.opset,
        "batch": options.batch,
        "batch_sizes": list(options.batch_sizes),
        "height": height,
        "width": width,
        "deepcache_branch": options.deepcache_branch,
        "max_prompt_chunks": options.max_prompt_chunks,
        "sizes": [list(size) for size in options.sizes or ((height, width),)],
        "geometry": geometry.__dict__,
        "components": entries,
        "versions": _versions(),
        "seconds": round(time.time() - started, 1),
    }
    manifest = ExportManifest.from_json(data, str(out_dir / MANIFEST))
    (out_dir / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, default=str))
    return manifest


def calibrated_on(weights: str, precision: str, controlnet_weights: list[str]) -> str:
    """What the images depend on besides how they were compiled: the model's weights and, for int8 U-Nets, the
    ControlNets they were calibrated with (fp32/fp16 U-Nets with residual inputs make the plain export's
    images for a request without ControlNet, and share its cache entries)."""
    if precision != "int8" or not controlnet_weights:
        return weights
    return hashlib.sha256("|".join([weights, *controlnet_weights]).encode()).hexdigest()


def model_facts(pipe) -> dict:
    """What the runtime needs from the PyTorch pipeline, kept for the manifest before the pipeline is freed."""
    return {
        "family": model_family(pipe),
        # SDXL: an empty negative prompt is all zeros, not the encoded "" (diffusers' force_zeros_for_empty_prompt)
        "zero_empty_negative": bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
        "scaling_factor": pipe.vae.config.scaling_factor,
        "scheduler_config": dict(pipe.scheduler.config),
    }


def unsplit_outputs(modules: dict, unet, feeds: dict, geometry: Geometry) -> dict[str, np.ndarray]:
    """In PyTorch: the unsplit diffusers U-Net's noise prediction, and unet_deep's and unet_shallow's (fed the
    deep feature of the same step) on `feeds`: what split_errors compares."""
    inputs = [torch.from_numpy(feeds[n]) for n in (SAMPLE, TIMESTEP, CONTEXT)]
    conditions, added = (), {}
    if TIME_IDS in feeds:  # SDXL's added conditions: our modules' inputs, and diffusers' arguments
        pooled, time_ids = torch.from_numpy(feeds[POOLED_EMBEDDING]), torch.from_numpy(feeds[TIME_IDS])
        conditions = (pooled, time_ids)
        added = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    # a U-Net for ControlNets: the validation's residuals too (the shallow model takes its skips' only)
    residuals = [torch.from_numpy(feeds[n]) for n in residual_names(len(geometry.control_residuals))]
    if residuals:
        added |= {"down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}
    shallow = residuals[: modules[UNET_SHALLOW].shallow_layers]
    with torch.no_grad():
        noise, deep = modules[UNET_DEEP](*inputs, *conditions, *residuals)
        return {
            "unsplit": unet(*inputs, **added).sample.numpy(),
            UNET_DEEP: noise.numpy(),
            UNET_SHALLOW: modules[UNET_SHALLOW](*inputs, deep, *conditions, *shallow).numpy(),
        }


def split_errors(unsplit: dict, out_dir: Path, feeds: dict, onnx_deep: dict) -> dict[str, dict[str, float]]:
    """unet_deep, and unet_shallow fed the deep feature of the same step, against the unsplit diffusers U-Net,
    in PyTorch (the split itself: exact) and in ONNX Runtime."""
    reference = {NOISE_PRED: unsplit["unsplit"]}
    onnx_shallow = run_onnx(out_dir / f"{UNET_SHALLOW}.onnx", {**feeds, DEEP_FEATURE: onnx_deep[DEEP_FEATURE]})
    onnx_outputs = {UNET_DEEP: onnx_deep[NOISE_PRED], UNET_SHALLOW: onnx_shallow[NOISE_PRED]}
    return {
        name: {
            "torch": max_error({NOISE_PRED: unsplit[name]}, reference),
            "onnx": max_error({NOISE_PRED: onnx_outputs[name]}, reference),
        }
        for name in (UNET_DEEP, UNET_SHALLOW)
    }


def component_precision(pipe, name: str, precision: str) -> str:
    """A component's graph precision: the export's, except SDXL's VAE, which overflows in fp16 and stays fp32
    where its config says `force_upcast`, as diffusers' SDXL pipelines upcast it (its SD pipelines never read
    the flag, which AutoencoderKL sets by default). Any other overflow is caught by the probe."""
    vae = name in (VAE_DECODER, VAE_ENCODER) and precision == "fp16"
    if vae and model_family(pipe) == "SDXL" and pipe.vae.config.get("force_upcast", False):
        return "fp32"
    return precision


def _copy_tokenizer(pipe, out_dir: Path) -> None:
    # The engines folder must be self-contained: the runtime tokenizes without the checkpoint.
    for name in TOKENIZER_DIRS:
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).save_pretrained(out_dir / name)


def _versions() -> dict:
    import diffusers
    import onnxruntime
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
