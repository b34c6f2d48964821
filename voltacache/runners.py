"""One runner interface, `infer(dict of arrays) -> dict of arrays`, for every backend.

Like polygraphy's TrtRunner / OnnxrtRunner: the pipeline, the Triton models and the benchmarks
hold runners and never care which backend is behind them. Every runner checks its feeds against
its component spec before running, so a wrong name, shape or dtype is a clear error, not a crash
inside a kernel.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .errors import VoltacacheError
from .specs import ComponentSpec


class Runner:
    spec: ComponentSpec

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check(feeds)
        return self._infer(feeds)

    def check(self, feeds: dict[str, np.ndarray]) -> None:
        for t in self.spec.inputs:
            if t.name not in feeds:
                raise VoltacacheError(f"{self.spec.name}: missing input {t.name!r}")
            value = feeds[t.name]
            if tuple(value.shape) != t.shape or value.dtype != np.dtype(t.dtype):
                got, expected = f"{value.dtype}{list(value.shape)}", f"{t.dtype}{list(t.shape)}"
                raise VoltacacheError(f"{self.spec.name}: input {t.name!r} is {got}, expected {expected}")

    def _infer(self, feeds):
        raise NotImplementedError


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime session on the optimized model written at build time."""

    def __init__(self, path: Path, spec: ComponentSpec, session_options: dict | None = None, providers=None):
        import onnxruntime as ort

        self.spec = spec
        options = ort.SessionOptions()
        for key, value in (session_options or {}).items():
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


class TorchRunner(Runner):
    """The PyTorch reference: the same modules the exporter exported.

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
    """A TensorRT engine with device buffers bound once; optional CUDA graph replay of the whole engine.

    Static shapes make both possible: every call copies into the same input buffers, runs, and
    copies out of the same output buffers, so the captured graph stays valid.
    """

    def __init__(self, plan: Path, spec: ComponentSpec, cuda_graph: bool = False):
        import tensorrt as trt
        import torch

        self.spec = spec
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise VoltacacheError(f"{plan}: TensorRT cannot deserialize it (corrupt, or built by another version)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.buffers = {}
        for t in (*spec.inputs, *spec.outputs):
            dtype = getattr(torch, t.dtype)
            self.buffers[t.name] = torch.empty(t.shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(t.name, self.buffers[t.name].data_ptr())
        self.graph = None
        if cuda_graph:
            self._run()  # warm up outside capture: TensorRT allocates lazily on the first run
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.stream):
                self.context.execute_async_v3(self.stream.cuda_stream)

    def _run(self):
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise VoltacacheError(f"{self.spec.name}: TensorRT execution failed")

    def _infer(self, feeds):
        import torch

        with torch.cuda.stream(self.stream):
            for name in self.spec.input_names:
                self.buffers[name].copy_(torch.from_numpy(feeds[name]), non_blocking=True)
            self.graph.replay() if self.graph is not None else self._run()
            out = {n: self.buffers[n].cpu().numpy() for n in self.spec.output_names}
        self.stream.synchronize()
        return out
