"""The engine backends, one row each: what runs an engine (its runner), the file it is, what it records of
the runtime it was built with and must find again to load, whether it can run here, how Triton serves it
natively, whether a LoRA can swap its weights, and what builds it (voltacache.compile). Build, load,
deploy and bench look a backend up here; adding one is a runner and a row (docs/architecture.md shows
the diff a third backend takes).

Torch-free and onnx-free, like the rest of the runtime: a row's checks import their runtime when asked.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UsageError

# Recorded in the manifest and applied by every runtime that loads these engines.
ORT_SESSION_OPTIONS = {
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "intra_op_num_threads": 0,  # 0: one thread per physical core
    "enable_cpu_mem_arena": True,
    "enable_mem_pattern": True,
}
# Served, each component is its own process and their sessions take turns on the same cores: a pool
# that spins after its run steals them from the next one. Measured on the tiny model through Triton,
# 8 clients: +24% images/s, the same at 1 client. In one process (generate --engines) spinning keeps
# its 10% lower latency (tiny, 20 steps: 0.202 s against 0.223 s).
SERVED_SESSION_OPTIONS = {"session.intra_op.allow_spinning": "0"}


def _onnxruntime_versions() -> dict:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


def _onnxruntime_available() -> tuple[bool, str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return False, "onnxruntime is not installed"
    return True, "ONNX Runtime's CPU provider runs everywhere"


def _tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT can build and run here, and why (or why not)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt package is not installed (pip install 'voltacache[gpu]')"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "tensorrt is installed but no CUDA GPU is visible"
        return True, f"tensorrt is installed and {torch.cuda.get_device_name(0)} is visible"
    except Exception as e:  # a broken CUDA install should read as a reason, not a crash
        return False, f"CUDA is not usable ({e})"


def _tensorrt_versions() -> dict:
    import tensorrt
    import torch

    return {
        "tensorrt": tensorrt.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
    }


def _onnxruntime_runner(path, spec, sizes, manifest, served: bool, cuda_graph: bool):
    from .runners import OnnxRuntimeRunner

    options = {**(manifest.session_options or {}), **(SERVED_SESSION_OPTIONS if served else {})}
    return OnnxRuntimeRunner(path, spec, options, sizes=sizes)


def _tensorrt_runner(path, spec, sizes, manifest, served: bool, cuda_graph: bool):
    from .runners import TensorRTRunner

    return TensorRTRunner(path, spec, sizes, cuda_graph=cuda_graph, chunks=manifest.export.max_prompt_chunks)


def _openvino_available() -> tuple[bool, str]:
    if importlib.util.find_spec("openvino") is None:
        return False, "openvino is not installed (pip install 'voltacache[openvino]')"
    return True, "OpenVINO runs on this CPU"


def _openvino_versions() -> dict:
    import openvino

    from .cpu import cpu

    return {"openvino": openvino.__version__.split("-")[0], "cpu": cpu()["model"], "cpu_flags": cpu()["flags"]}


def _openvino_runner(path, spec, sizes, manifest, served: bool, cuda_graph: bool):
    from .runners import OpenVinoRunner

    return OpenVinoRunner(path, spec, manifest.inference_precision or "f32", sizes)


@dataclass(frozen=True)
class Backend:
    name: str
    suffix: str  # the engine file's: "<component><suffix>"
    load: Callable  # (path, spec, sizes, EngineManifest, served, cuda_graph) -> Runner
    versions: Callable[[], dict]  # what a build records of the runtime (and device)
    must_match: tuple[str, ...]  # the recorded versions that must be the same to load the engines
    available: Callable[[], tuple[bool, str]]  # (whether it can run here, why)
    builder: str  # "module:function" in voltacache.compile that builds one component
    triton: dict = field(default_factory=dict)  # Triton's own backend for it: config fields and the file name
    lora: str = "always"  # always: a LoRA swaps its weights; refittable: when built so; never
    session_options: dict | None = None  # recorded in the manifest, applied where the engines load
    precisions: tuple[str, ...] = ("fp16", "fp32", "int8")  # the export precisions it builds

    def build(self, *args, **kwargs) -> str:
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)(*args, **kwargs)

    def check_versions(self, recorded: dict) -> tuple[str, object, object] | None:
        """The first recorded version this runtime does not have: (key, built with, here), or None."""
        now = self.versions()
        return next(((k, recorded.get(k), now.get(k)) for k in self.must_match if recorded.get(k) != now.get(k)), None)


BACKENDS = {
    "onnxruntime": Backend(
        "onnxruntime",
        ".onnx",
        _onnxruntime_runner,
        _onnxruntime_versions,
        ("onnxruntime",),
        _onnxruntime_available,
        "voltacache.compile.build:build_onnxruntime",
        triton={"config": {"backend": "onnxruntime"}, "file": "model.onnx"},
        session_options=ORT_SESSION_OPTIONS,
    ),
    "tensorrt": Backend(
        "tensorrt",
        ".plan",
        _tensorrt_runner,
        lambda: {**_onnxruntime_versions(), **_tensorrt_versions()},
        ("tensorrt", "compute_capability"),
        _tensorrt_available,
        "voltacache.compile.build:build_tensorrt",
        triton={"config": {"platform": "tensorrt_plan"}, "file": "model.plan"},
        lora="refittable",
    ),
    # no Triton backend here: the CPU server runs it in the python component models (the NGC container's
    # own OpenVINO backend reads IR too, but was not tried: docs/architecture.md)
    "openvino": Backend(
        "openvino",
        ".xml",
        _openvino_runner,
        _openvino_versions,
        ("openvino",),
        _openvino_available,
        "voltacache.compile.build:build_openvino",
        lora="never",
        precisions=("fp32", "bf16", "int8"),
    ),
}
AUTO_ORDER = ("tensorrt", "openvino", "onnxruntime")  # `--backend auto`: TensorRT where it runs, else timed


def backend(name: str, arg: str = "--backend") -> Backend:
    if name not in BACKENDS:
        raise UsageError(f"{arg} {name!r}: use auto, {', '.join(BACKENDS)}")
    return BACKENDS[name]


def candidates(requested: str, precision: str) -> tuple[list[Backend], str]:
    """The backends `--backend` allows for an export of `precision` that can run here, and why: one when
    named (refused with the reason when it cannot), every one of AUTO_ORDER that can for `auto`."""
    if requested != "auto":
        chosen = backend(requested)
        if precision not in chosen.precisions:
            others = [n for n in AUTO_ORDER if precision in BACKENDS[n].precisions]
            raise UsageError(
                f"--backend {requested}: builds {', '.join(chosen.precisions)} exports, not {precision}; "
                f"use --backend {' or '.join(others)}"
            )
        ok, why = chosen.available()
        if not ok:
            raise UsageError(f"--backend {requested}: {why}")
        return [chosen], "requested"
    found, reasons = [], []
    for name in AUTO_ORDER:
        row = BACKENDS[name]
        ok, why = row.available()
        if ok and precision in row.precisions:
            found.append(row)
        elif not ok:
            reasons.append(why)
    if not found:
        raise UsageError(f"--backend auto: no backend builds a {precision} export here ({'; '.join(reasons)})")
    return found, "; ".join(reasons)


def choose_backend(requested: str, precision: str = "fp32") -> tuple[Backend, str]:
    """The backend to build with, and why, without timing: the named one, or the first `auto` allows."""
    found, why = candidates(requested, precision)
    return found[0], why or f"{found[0].name} is the first that runs here"
