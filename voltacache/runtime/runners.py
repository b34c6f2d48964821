"""One runner interface, `infer(dict of arrays) -> dict of arrays`, for every backend.

Like polygraphy's TrtRunner / OnnxrtRunner: the pipeline, the Triton models and the benchmarks
hold runners and never care which backend is behind them. A call holds any number n >= 1 of
images (n x spec.rows_per_image rows per tensor), so a server can run many requests' steps in
one call. Every runner checks its feeds against its component spec for n images before running,
so a wrong name, shape or dtype is a clear error, not a crash inside a kernel. Above the largest
size the engine was built for, a call is split into several; an engine that runs only its built
sizes (TensorRT) gets the rest padded with zero rows, and the padding sliced off its outputs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import VoltacacheError
from ..specs import PROMPT_AXIS, ComponentSpec


def plan_calls(n: int, sizes: tuple[int, ...], pad: bool) -> list[tuple[int, int, int]]:
    """How n images run on an engine built for `sizes` images per call: (first image, images, size
    it runs at) per call. Calls of the largest size while more remain, then one call for the rest,
    at the smallest size that holds it when the engine pads, at exactly the rest when it does not.
    No sizes: any n in one call."""
    if not sizes:
        return [(0, n, n)]
    largest, start, calls = max(sizes), 0, []
    while n - start > largest:
        calls.append((start, largest, largest))
        start += largest
    rest = n - start
    calls.append((start, rest, min(s for s in sizes if s >= rest) if pad else rest))
    return calls


def pad_rows(value: np.ndarray, rows: int) -> np.ndarray:
    """`value` with zero rows appended up to `rows` (itself when it has them)."""
    if len(value) == rows:
        return value
    padded = np.zeros((rows, *value.shape[1:]), value.dtype)
    padded[: len(value)] = value
    return padded


class Runner:
    spec: ComponentSpec  # shapes for the export's batch; a call may hold any number of images
    sizes: tuple[int, ...] = ()  # images per call the engine was built for; () runs any number in one call
    pads = False  # whether a call runs at one of `sizes` exactly, zero rows filling it up

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, rows = self.check(feeds), self.spec.rows_per_image
        parts = []
        for start, count, size in plan_calls(n, self.sizes, self.pads):
            part = slice(start * rows, (start + count) * rows)
            chunk = {k: pad_rows(feeds[k][part], size * rows) for k in self.spec.input_names}
            parts.append({k: v[: count * rows] for k, v in self._infer(chunk).items()})
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in self.spec.output_names}

    def check(self, feeds: dict[str, np.ndarray]) -> int:
        """The number of images in `feeds`, each input checked against the spec for that many."""
        spec, per_image, n = self.spec, self.spec.rows_per_image, 0
        latent = spec.latent_of(feeds)
        if latent is not None and latent not in spec.served_latents:
            sizes = ", ".join(f"{h}x{w}" for h, w in spec.served_latents)
            raise VoltacacheError(f"{spec.name}: latents of {latent[0]}x{latent[1]}; the engine takes {sizes}")
        for i, t in enumerate(spec.inputs):
            if t.name not in feeds:
                raise VoltacacheError(f"{spec.name}: missing input {t.name!r}")
            value = feeds[t.name]
            if not n and value.ndim == len(t.shape) and len(value) and len(value) % per_image == 0:
                n = len(value) // per_image  # the first input tells how many images the call holds
                shapes = spec.for_images(n, spec.chunks(feeds), latent)  # its prompt chunks, its latents' size
            if n:
                shape = shapes.inputs[i].shape
                expected = f"{t.dtype}{list(shape)} ({n} images)"
            else:
                shape = None
                dims = [f"{per_image}n" if per_image > 1 else "n", *map(str, t.shape[1:])]
                expected = f"{t.dtype}[{', '.join(dims)}] (n >= 1 images)"
            if tuple(value.shape) != shape or value.dtype != np.dtype(t.dtype):
                raise VoltacacheError(
                    f"{spec.name}: input {t.name!r} is {value.dtype}{list(value.shape)}, expected {expected}"
                )
        return n

    def _infer(self, feeds):
        """Run one call whose feeds hold one of `sizes` images (any number when there are none)."""
        raise NotImplementedError


# engines built before ONNX Runtime engines kept their weights beside the graph (build.build_onnxruntime)
WEIGHTS_INSIDE = "holds its weights inside the graph, where a LoRA cannot replace them; run `voltacache build --force`"


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime session on the optimized model written at build time.

    The graph's row dimension is dynamic: a call runs exactly its n images, never padded, since on
    a CPU the compute grows with the rows and padding would only cost. `sizes` only splits calls
    above the largest size (memory stays what the export was sized for).
    """

    def __init__(
        self,
        path: Path,
        spec: ComponentSpec,
        session_options: dict | None = None,
        providers=None,
        sizes: tuple[int, ...] = (),
        initializers: dict[str, np.ndarray] | None = None,
    ):
        import onnxruntime as ort

        self.path, self.spec, self.sizes = Path(path), spec, tuple(sizes)
        self.session_options, self.providers = session_options, providers
        self.base_weights: dict[str, np.ndarray] = {}  # initializers read from the file (LoRA's base)
        options = ort.SessionOptions()
        # replacements of weights the file keeps beside its graph (a LoRA variant): ONNX Runtime takes them
        # in place of the file's as it loads the graph, before any rewrite reads them (add_initializer's
        # come after: fp16 weights' casts and NCHWc's reordered Conv weights were folded from the file's);
        # the arrays must outlive the session
        initializers = initializers or {}
        self.replaced = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in initializers.values()]
        if initializers:
            options.add_external_initializers(list(initializers), self.replaced)
        for key, value in (session_options or {}).items():
            if key.startswith("session."):  # a session config entry (onnxruntime_session_options_config_keys.h)
                options.add_session_config_entry(key, str(value))
                continue
            if key == "graph_optimization_level":
                value = getattr(ort.GraphOptimizationLevel, value)
            setattr(options, key, value)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise VoltacacheError(f"{path}: ONNX Runtime cannot load it ({e}); rebuild with `voltacache build`") from e

    def _infer(self, feeds):
        names = self.spec.output_names
        return dict(zip(names, self.session.run(names, {n: feeds[n] for n in self.spec.input_names})))

    def initializers(self, names) -> dict[str, np.ndarray]:
        """Initializers' values as the file holds them (each read once: a LoRA variant adds to them)."""
        missing = set(names) - set(self.base_weights)
        if missing:
            import onnx
            from onnx import numpy_helper

            found = {i.name: i for i in onnx.load(str(self.path), load_external_data=False).graph.initializer}
            for name in missing:
                if name not in found:
                    raise VoltacacheError(f"{self.path}: no initializer {name!r}; rebuild with `voltacache build`")
                if found[name].data_location != onnx.TensorProto.EXTERNAL:
                    raise VoltacacheError(f"{self.path}: {WEIGHTS_INSIDE}")
                self.base_weights[name] = numpy_helper.to_array(found[name], base_dir=str(self.path.parent))
        return {name: self.base_weights[name] for name in names}

    def with_initializers(self, values: dict[str, np.ndarray]) -> OnnxRuntimeRunner:
        """A session over the same file with these initializers replaced (the file is not changed)."""
        return OnnxRuntimeRunner(self.path, self.spec, self.session_options, self.providers, self.sizes, values)


class OpenVinoRunner(Runner):
    """An OpenVINO model (IR written at build time) compiled for this CPU at the precision it was built for:
    f32, or bf16 on the CPU's bf16 units (AVX-512 BF16, AMX). Like ONNX Runtime's, the row dimension is
    dynamic: a call runs exactly its n images. Compiled models are cached per model and precision in
    ~/.cache/voltacache/openvino (never in the engines folder: it holds only what build wrote)."""

    def __init__(self, path: Path, spec: ComponentSpec, precision: str = "f32", sizes: tuple[int, ...] = ()):
        import openvino as ov

        self.path, self.spec, self.sizes, self.precision = Path(path), spec, tuple(sizes), precision
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": str(ov_cache())}
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as e:  # openvino raises RuntimeError for a file it cannot read
            raise VoltacacheError(f"{path}: OpenVINO cannot load it ({e}); rebuild with `voltacache build`") from e
        self.request = self.compiled.create_infer_request()

    def _infer(self, feeds):
        self.request.infer({n: feeds[n] for n in self.spec.input_names})
        # copies: the request's output buffers are reused by the next call
        return {n: np.array(self.request.get_tensor(n).data) for n in self.spec.output_names}


def ov_cache() -> Path:
    return Path.home() / ".cache" / "voltacache" / "openvino"


class TorchRunner(Runner):
    """The PyTorch reference: the same modules the exporter exported, any number of images per call.

    On a GPU with flash-attn installed, diffusers' attention dispatcher runs its kernels.
    """

    def __init__(self, module, spec: ComponentSpec, device: str = "cpu"):
        self.module, self.spec, self.device = module.to(device), spec, device
        if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
            for sub in module.modules():
                if hasattr(sub, "set_attention_backend"):  # diffusers models
                    sub.set_attention_backend("flash")

    def _infer(self, feeds):
        import torch

        with torch.no_grad():
            out = self.module(*(torch.from_numpy(feeds[n]).to(self.device) for n in self.spec.input_names))
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.float().cpu().numpy() for n, o in zip(self.spec.output_names, out)}


class TensorRTRunner(Runner):
    """A TensorRT plan with one static optimization profile per (latent size, images per call): profile
    i x len(sizes) + j runs latents of spec.served_latents[i] for sizes[j] images, static but for the prompt's
    context: one to `chunks` chunks (voltacache.runtime.tokenizer).

    Each profile gets its own execution context (TensorRT lets two contexts of one engine never
    share a profile), bound once to its input shapes and device buffers, and optionally captured
    as a CUDA graph: every call of a size copies into the same buffers, so its graph stays valid (a call
    with a longer prompt sets its context's shape and runs outside the graph, which holds one window).
    The contexts run one at a time on one stream, so they share one block of activation memory and
    one buffer per tensor, sized for the largest profile (a smaller profile uses its first elements).
    """

    pads = True  # static profiles: a call runs at a built size

    def __init__(
        self,
        plan: Path,
        spec: ComponentSpec,
        sizes: tuple[int, ...],
        cuda_graph: bool = False,
        initializers: dict[str, np.ndarray] | None = None,
        chunks: int = 1,
    ):
        import tensorrt as trt
        import torch

        self.plan, self.spec, self.sizes, self.cuda_graph = Path(plan), spec, tuple(sizes), cuda_graph
        self.chunks = chunks
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise VoltacacheError(f"{plan}: TensorRT cannot deserialize it (corrupt, or built by another version)")
        profiles = profile_shapes(spec, self.sizes)
        if self.engine.num_optimization_profiles != len(profiles):
            raise VoltacacheError(
                f"{plan}: {self.engine.num_optimization_profiles} optimization profiles for {len(profiles)} "
                f"(batch sizes {list(self.sizes)}, latent sizes {list(spec.served_latents)}); rebuild with "
                "`voltacache build`"
            )
        if initializers:
            self._refit(trt, initializers)
        self.stream = torch.cuda.Stream()
        elements, dtypes = {}, {}
        for latent in spec.served_latents or (None,):
            largest = spec.for_images(max(self.sizes), chunks, latent)
            for t in (*largest.inputs, *largest.outputs):
                elements[t.name] = max(elements.get(t.name, 0), int(np.prod(t.shape)))
                dtypes[t.name] = getattr(torch, t.dtype)
        self.buffers = {name: torch.empty(n, dtype=dtypes[name], device="cuda") for name, n in elements.items()}
        self.memory = torch.empty(self.engine.device_memory_size_v2, dtype=torch.uint8, device="cuda")
        self.contexts, self.graphs = {}, {}
        for index, (key, shapes) in enumerate(profiles.items()):
            self.contexts[key] = self._context(trt, index, shapes)
        self.stream.synchronize()
        if cuda_graph:
            for key, context in self.contexts.items():
                self._run(context)  # warm up outside capture: TensorRT allocates lazily on the first run
                self.graphs[key] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graphs[key], stream=self.stream):
                    context.execute_async_v3(self.stream.cuda_stream)

    def _refit(self, trt, values: dict[str, np.ndarray]) -> None:
        """The engine's weights named after the ONNX initializers replaced (TensorRT's refit API), before
        any context or CUDA graph holds them."""
        if not self.engine.refittable:
            raise VoltacacheError(f"{self.plan}: not refittable; rebuild with `voltacache build --refittable` for LoRA")
        refitter = trt.Refitter(self.engine, self.logger)
        self._keep = [np.ascontiguousarray(v) for v in values.values()]  # TensorRT reads them during the refit
        for (name, _), value in zip(values.items(), self._keep):
            if not refitter.set_named_weights(name, trt.Weights(value)):
                raise VoltacacheError(f"{self.plan}: TensorRT has no refittable weight {name!r}; rebuild it")
        if not refitter.refit_cuda_engine():
            raise VoltacacheError(f"{self.plan}: TensorRT refit failed (missing: {refitter.get_missing_weights()})")

    def initializers(self, names) -> dict[str, np.ndarray]:
        """The engine's weights named after ONNX initializers, as built (a refittable engine keeps them)."""
        import tensorrt as trt

        refitter = trt.Refitter(self.engine, self.logger)
        return {name: refitter.get_named_weights(name).numpy().copy() for name in names}

    def with_initializers(self, values: dict[str, np.ndarray]) -> TensorRTRunner:
        """Another copy of the engine, refitted with these weights (the plan file is not changed)."""
        return TensorRTRunner(self.plan, self.spec, self.sizes, self.cuda_graph, values, self.chunks)

    def _context(self, trt, index: int, shapes: ComponentSpec):
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self.memory.data_ptr(), self.memory.numel())
        ok = context.set_optimization_profile_async(index, self.stream.cuda_stream)
        ok = ok and all(context.set_input_shape(t.name, t.shape) for t in shapes.inputs)
        if not ok:
            raise VoltacacheError(f"{self.spec.name}: the engine has no profile {index} for {shapes.images} images")
        for t in (*shapes.inputs, *shapes.outputs):
            context.set_tensor_address(t.name, self.buffers[t.name].data_ptr())
        return context

    def _run(self, context):
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise VoltacacheError(f"{self.spec.name}: TensorRT execution failed")

    def _infer(self, feeds):
        import torch

        rows = len(feeds[self.spec.input_names[0]])
        size, chunks, latent = rows // self.spec.rows_per_image, self.spec.chunks(feeds), self.spec.latent_of(feeds)
        key = (latent, size)
        context, shapes = self.contexts[key], self.spec.for_images(size, chunks, latent)
        for t in shapes.inputs:  # the context's length, as this call's prompt
            if t.name in PROMPT_AXIS and tuple(context.get_tensor_shape(t.name)) != t.shape:
                context.set_input_shape(t.name, t.shape)
        with torch.cuda.stream(self.stream):
            for name in self.spec.input_names:
                value = torch.from_numpy(feeds[name])
                self.buffers[name][: value.numel()].view(value.shape).copy_(value, non_blocking=True)
            self.graphs[key].replay() if key in self.graphs and chunks == 1 else self._run(context)
            out = {
                t.name: self.buffers[t.name][: int(np.prod(t.shape))].view(t.shape)[:rows].cpu().numpy()
                for t in shapes.outputs
            }
        self.stream.synchronize()
        return out


def profile_shapes(spec: ComponentSpec, sizes: tuple[int, ...]) -> dict:
    """{(latent size, images): shapes at one prompt chunk}: the engine's optimization profiles, in the order
    the builder adds them (voltacache.compile.build), each latent size's batch sizes together."""
    return {
        (latent, size): spec.for_images(size, 1, latent) for latent in spec.served_latents or (None,) for size in sizes
    }
