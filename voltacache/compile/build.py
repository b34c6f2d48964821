"""Build engines from an export: TensorRT plans on a GPU, optimized ONNX Runtime models elsewhere.

The TensorRT path is polygraphy's loaders composed (NetworkFromOnnxPath -> CreateConfig ->
EngineFromNetwork -> SaveEngine) with one static profile (min = opt = max) per size in the export's
`batch_sizes`, shapes from the component spec, and each engine is checked against ONNX Runtime at
every size with polygraphy's Comparator before the build is done. The ONNX Runtime model keeps the
graph's dynamic row dimension. The engine manifest records what the engines were built from and
for; `load_engines` refuses engines whose manifest does not match the runtime, the GPU or the
source ONNX, and engines from an export made before step batching.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportError, UsageError, VoltacacheError
from ..outputs import ENGINES, refuse_overlap, staged_output
from ..pipeline.calibration import carry_calibrations
from ..runtime.backends import BACKENDS, Backend, candidates
from ..runtime.backends import backend as find_backend
from ..runtime.cpu import cpu, has_bf16
from ..runtime.engines import onnx_fingerprint, onnx_stats
from ..runtime.manifests import ENGINE_MANIFEST, EngineManifest, ExportManifest, read_manifest
from ..runtime.runners import profile_shapes
from ..runtime.tokenizer import TOKENIZER_DIRS
from ..specs import TEXT_IDS, TIME_IDS, TIMESTEP, UNET_DEEP

BACKEND_OPENVINO = BACKENDS["openvino"]
# The saved model is optimized only as far as stays portable across CPUs (layout-specific
# NCHWc rewrites happen at load time, under ORT_ENABLE_ALL).
ORT_SAVED_LEVEL = "ORT_ENABLE_EXTENDED"
ORT_EXTERNAL_MIN_BYTES = 64  # initializers kept beside the graph: every weight, not shapes and scalars
# An engine against ONNX Runtime on the same ONNX, random inputs (atol = rtol): fp16 kernels against fp32-io
# ONNX Runtime; int8 against ONNX Runtime's own int8 kernels, which fuse and round differently.
TRT_TOLERANCE = {"fp16": 2e-2, "fp32": 2e-2, "int8": 1e-1}


@dataclass(frozen=True)
class BuildOptions:
    """How to build, beyond what the export fixed; each backend reads what concerns it."""

    optimization_level: int = 3  # TensorRT's builder level (0-5)
    timing_cache: Path | None = None  # TensorRT's tactic timings, shared by every build on this machine
    refittable: bool = False  # TensorRT: weights a LoRA can replace (ONNX Runtime's always can be)


def default_timing_cache() -> Path:
    return Path.home() / ".cache" / "voltacache" / "tensorrt-timing.cache"


def build_engines(
    onnx_dir: Path,
    out_dir: Path,
    backend: str = "auto",
    optimization_level: int = 3,
    progress=None,
    timing_cache: Path | None = None,
    force: bool = False,
    refittable: bool = False,
    reason: str | None = None,
    selection: dict | None = None,
) -> EngineManifest:
    """Build one engine per component of the export in `onnx_dir` with a backend of the table
    (voltacache.runtime.backends; `auto` picks one and says why); returns the engine manifest.
    `refittable`: TensorRT engines whose weights a LoRA can replace (voltacache.pipeline.lora).

    The engines are written into a temporary sibling of `out_dir`, renamed into place once every
    engine is built and checked; earlier engines there are replaced only with `force`, anything
    else there is refused.
    """
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    export = read_manifest(onnx_dir)
    if reason is not None:  # the caller chose (and said why)
        chosen = find_backend(backend)
    else:
        chosen, reason, selection = select_backend(backend, export, onnx_dir)
    if export.precision == "bf16" and not has_bf16():
        raise UsageError(
            f"--onnx {onnx_dir}: a bf16 export, and this CPU ({cpu()['model']}) has no bf16 instructions "
            "(AVX-512 BF16 or AMX); export fp32 for it"
        )
    refuse_overlap(out_dir, onnx_dir, "--out", "--onnx")
    options = BuildOptions(optimization_level, timing_cache or default_timing_cache(), refittable)
    # the engines' DeepCache calibration is measured on the export: kept over a rebuild of the same one
    carry = functools.partial(carry_calibrations, fingerprint=export.fingerprint)
    with staged_output(out_dir, ENGINES, force=force, arg="--out", carry=carry) as stage:
        return _build(onnx_dir, stage, export, chosen, reason, options, progress, selection)


def select_backend(
    requested: str, export: ExportManifest, onnx_dir: Path, timing: Callable[[], None] = lambda: None
) -> tuple[Backend, str, dict | None]:
    """(backend, why, what was measured): the named one; for `auto`, TensorRT where it runs, else each CPU
    backend that builds this export's precision timed on one unet_deep call of this export, the fastest
    taken (ratios move with the CPU: docs/benchmarks.md). `timing` is called when the timing starts."""
    found, why = candidates(requested, export.precision)
    if len(found) == 1 or found[0].name == "tensorrt":
        return found[0], why or f"{found[0].name}: the only one that builds {export.precision} here", None
    timing()
    timings = {b.name: round(time_unet(b, export, onnx_dir), 4) for b in found}
    best = min(timings, key=timings.get)
    shown = ", ".join(f"{name} {seconds:.3f} s" for name, seconds in sorted(timings.items(), key=lambda i: i[1]))
    selection = {"cpu": cpu(), "component": UNET_DEEP, "seconds": timings, "chosen": best}
    return BACKENDS[best], f"fastest on one {UNET_DEEP} call on {cpu()['model']}: {shown}", selection


def time_unet(chosen: Backend, export: ExportManifest, onnx_dir: Path, repeats: int = 3) -> float:
    """The median seconds of one unet_deep call (the export's batch) on a backend, straight from the ONNX."""
    import statistics
    import tempfile

    import numpy as np

    spec = export.components[UNET_DEEP].spec
    source = onnx_dir / export.components[UNET_DEEP].file
    with tempfile.TemporaryDirectory(prefix="voltacache-select-") as scratch:
        options = BuildOptions(timing_cache=default_timing_cache())
        file, _ = chosen.build(source, Path(scratch), UNET_DEEP, export, options, check=False)
        manifest = EngineManifest(
            chosen.name,
            "",
            {},
            {},
            export,
            str(onnx_dir),
            "",
            {},
            session_options=chosen.session_options,
            inference_precision=inference_precision(chosen, export),
        )
        runner = chosen.load(Path(scratch) / file, spec, export.batch_sizes, manifest, False, False)
        rng = np.random.default_rng(0)
        feeds = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in spec.inputs}
        runner.infer(feeds)  # the first call pays for allocations
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            runner.infer(feeds)
            seconds.append(time.perf_counter() - started)
        return statistics.median(seconds)


def _build(
    onnx_dir: Path,
    out_dir: Path,
    export: ExportManifest,
    chosen: Backend,
    reason: str,
    options,
    progress,
    selection: dict | None = None,
) -> EngineManifest:
    started = time.time()
    tokenizers = TOKENIZER_DIRS[: export.geometry.text_encoders]
    for name in tokenizers:
        if not (onnx_dir / name).is_dir():
            raise ExportError(f"{onnx_dir / name}: missing from the export; run `voltacache export` again")
    files, report = {}, {}
    for name in export.components:  # the model's, then each ControlNet's
        if progress:
            progress(name)
        source = onnx_dir / export.components[name].file
        if not source.is_file():
            raise ExportError(f"{source}: missing from the export; run `voltacache export` again")
        files[name], report[name] = chosen.build(source, out_dir, name, export, options)
    for name in tokenizers:
        shutil.copytree(onnx_dir / name, out_dir / name, dirs_exist_ok=True)
    manifest = EngineManifest(
        backend=chosen.name,
        backend_reason=reason,
        versions=chosen.versions(),
        files=files,
        export=export,
        onnx_dir=str(onnx_dir.resolve()),
        onnx_fingerprint=onnx_fingerprint(onnx_dir),
        onnx_stats=onnx_stats(onnx_dir),
        session_options=chosen.session_options,
        optimization_level=options.optimization_level if chosen.name == "tensorrt" else None,
        refittable=chosen.lora == "always" or (chosen.lora == "refittable" and options.refittable),
        inference_precision=inference_precision(chosen, export),
        report={name: r for name, r in report.items() if r},
        selection=selection,
        seconds=round(time.time() - started, 1),
    )
    (out_dir / ENGINE_MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, default=str))
    return manifest


def build_onnxruntime(source: Path, out_dir: Path, name: str, export: ExportManifest, options, check: bool = True):
    """ONNX Runtime's optimized graph of one component (its weights beside it), as `load_engines` runs it."""
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import (
        Fail,
        InvalidArgument,
        InvalidGraph,
        InvalidProtobuf,
        NoSuchFile,
    )

    target = out_dir / f"{name}.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_SAVED_LEVEL)
    options.optimized_model_filepath = str(target)
    # The weights go beside the graph (`<name>.onnx.data`, which a graph over 2 GB needs anyway): a LoRA
    # variant hands ONNX Runtime replacements for them, which it takes before it optimizes the graph
    # (runners.OnnxRuntimeRunner); replacements for weights inside the graph come after its rewrites.
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", target.name + ".data")
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", str(ORT_EXTERNAL_MIN_BYTES)
    )
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except (InvalidProtobuf, InvalidGraph, InvalidArgument, NoSuchFile, Fail) as e:
        raise ExportError(
            f"{source}: ONNX Runtime cannot read this ONNX file ({e}); run `voltacache export` again"
        ) from e
    return target.name, {}


def build_tensorrt(source: Path, out_dir: Path, name: str, export: ExportManifest, options, check: bool = True):
    """A TensorRT plan of one component, one static profile per engine size, checked against ONNX Runtime."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine
    from polygraphy.exception import PolygraphyException

    spec, sizes, timing_cache = export.components[name].spec, export.batch_sizes, options.timing_cache
    # one static profile per (latent size, images per call), in the order the runner reads them
    # (runners.profile_shapes): each is tuned for its shapes exactly, but for the prompt's context, which
    # spans one to the export's max_prompt_chunks chunks (tuned for one)
    profiles = []
    for (latent, size), shapes in profile_shapes(spec, sizes).items():
        profile, longest = Profile(), spec.for_images(size, export.max_prompt_chunks, latent)
        for t, most in zip(shapes.inputs, longest.inputs):
            profile.add(t.name, min=t.shape, opt=t.shape, max=most.shape)
        profiles.append(profile)
    # fp16 ONNX carries its own types: strongly typed keeps TensorRT from re-deciding precisions. An int8
    # export is explicitly quantized (QDQ): TensorRT takes its scales as they are (no calibrator at build
    # time) and runs what is left unquantized in fp16.
    precision = export.precision
    strongly_typed = precision == "fp16"
    try:  # parsed now, so that a damaged file is told apart from a failed build
        network = NetworkFromOnnxPath(str(source), strongly_typed=strongly_typed)()
    except PolygraphyException as e:
        raise ExportError(
            f"{source}: TensorRT's ONNX parser cannot read this file ({e}); run `voltacache export` again"
        ) from e
    config = CreateConfig(
        fp16=not strongly_typed and precision in ("fp16", "int8"),
        int8=precision == "int8",
        profiles=profiles,
        builder_optimization_level=options.optimization_level,
        # LoRA by refit: the weights named after the ONNX initializers stay replaceable in the plan
        refittable=options.refittable,
        # one timing cache for every build on this machine: tactic timings carry over between engines
        load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
    )
    target = out_dir / f"{name}.plan"
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    SaveEngine(EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache)), str(target))()
    if check:
        compare_with_onnxruntime(target, source, spec, sizes, TRT_TOLERANCE[precision])
    return target.name, {}


def inference_precision(chosen: Backend, export: ExportManifest) -> str | None:
    """What OpenVINO computes in: the CPU's bf16 units for a bf16 export, f32 otherwise (int8 runs its QDQ)."""
    if chosen.name != "openvino":
        return None
    return "bf16" if export.precision == "bf16" else "f32"


def build_openvino(source: Path, out_dir: Path, name: str, export: ExportManifest, options, check: bool = True):
    """OpenVINO's model (IR: `<name>.xml` and its weights `<name>.bin`) of one component, read from the ONNX as
    exported (fused Attention and QDQ included), with its error against ONNX Runtime on the same ONNX measured
    at the precision it will run: (file, {"error": ...}), recorded in the engine manifest."""
    import openvino as ov

    from ..runtime.runners import OnnxRuntimeRunner, OpenVinoRunner

    try:
        model = ov.convert_model(str(source))
    except Exception as e:  # openvino raises its own errors for a file it cannot read
        raise ExportError(f"{source}: OpenVINO cannot read this ONNX file ({e}); run `voltacache export` again") from e
    target = out_dir / f"{name}.xml"
    ov.save_model(model, str(target), compress_to_fp16=False)  # weights as exported: the precision is the hint's
    if not check:
        return target.name, {}
    spec = export.components[name].spec
    runner = OpenVinoRunner(target, spec, inference_precision(BACKEND_OPENVINO, export))
    reference = OnnxRuntimeRunner(source, spec)
    return target.name, {"error": round(relative_error(runner, reference, spec), 6)}


def relative_error(runner, reference, spec, seed: int = 0) -> float:
    """graphs.max_error on random inputs (ids in the vocabulary, timesteps in [0, 1000))."""
    import numpy as np

    from .graphs import max_error

    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        if t.name in TEXT_IDS:
            feeds[t.name] = rng.integers(0, 49407, t.shape).astype(t.dtype)
        elif t.name in (TIMESTEP, TIME_IDS):
            feeds[t.name] = rng.integers(0, 1000, t.shape).astype(t.dtype)
        else:
            feeds[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
    return max_error(runner.infer(feeds), reference.infer(feeds))


def compare_with_onnxruntime(plan: Path, source: Path, spec, sizes, tolerance: float = 2e-2) -> None:
    """polygraphy's Comparator: each of the engine's profiles and ONNX Runtime on the same random inputs."""
    import numpy as np
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, CompareFunc, DataLoader

    engine, session = EngineFromBytes(BytesFromPath(str(plan)))(), SessionFromOnnx(str(source))()
    for index, ((latent, size), profile) in enumerate(profile_shapes(spec, sizes).items()):
        shapes = TensorMetadata()
        for t in profile.inputs:
            shapes.add(t.name, np.dtype(t.dtype), t.shape)
        ids = {t.name: (0, 49407) for t in spec.inputs if t.name in TEXT_IDS}
        loader = DataLoader(val_range=ids, iterations=2, input_metadata=shapes)
        runners = [TrtRunner(engine, optimization_profile=index), OnnxrtRunner(session)]
        results = Comparator.run(runners, data_loader=loader)
        compare = CompareFunc.simple(atol=tolerance, rtol=tolerance)
        if not bool(Comparator.compare_accuracy(results, compare_func=compare)):
            raise VoltacacheError(
                f"{plan.name}: TensorRT output at {size} images (latents {latent}) differs from ONNX Runtime beyond "
                f"atol/rtol {tolerance}"
            )
