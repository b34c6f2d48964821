"""Running and saving graphs while compiling: the PyTorch modules and ONNX Runtime on the same feeds,
their difference, and ONNX files saved and memory given back between stages (export and quantize)."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import numpy as np
import onnx
import torch

from ..specs import ComponentSpec

EXTERNAL_DATA_BYTES = 1_800_000_000


def run_torch(module, spec: ComponentSpec, feeds: dict) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    out = out if isinstance(out, tuple) else (out,)
    return {n: o.numpy() for n, o in zip(spec.output_names, out)}


def ort_session(path: Path):
    """A lean session for validation: the graph as exported (no fusions that copy weights), no arena."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path_or_session, feeds: dict) -> dict[str, np.ndarray]:
    session = ort_session(path_or_session) if isinstance(path_or_session, Path) else path_or_session
    names, inputs = [o.name for o in session.get_outputs()], {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in inputs})))


def max_error(got: dict, ref: dict) -> float:
    """Max abs difference over all outputs, relative to max(1, max |reference|)."""
    return max(float(np.abs(got[k] - ref[k]).max() / max(1.0, np.abs(ref[k]).max())) for k in ref)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    external = model.ByteSize() > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=external, location=data.name if external else None)


def release_memory() -> None:
    """Collect, then hand freed heap back to the OS: protobuf frees gigabytes of weights in small
    blocks that glibc otherwise keeps, and the next big allocation (an ONNX Runtime session) comes on top."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
