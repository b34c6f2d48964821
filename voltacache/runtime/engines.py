"""Loading built engines: their manifest checked against this runtime (versions, GPU, source export),
one runner per component. Torch-free and onnx-free: every served model loads its engine through here."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import RebuildNeeded, VoltacacheError
from ..specs import COMPONENTS
from .manifests import current_export, read_engine_manifest, read_manifest, specs_from_manifest
from .runners import OnnxRuntimeRunner, Runner, TensorRTRunner

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


def onnx_stats(onnx_dir: Path) -> dict:
    """Size and modification time per ONNX file: a cheap first check before hashing gigabytes."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(onnx_dir).glob("*.onnx*"))}


def onnx_fingerprint(onnx_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(onnx_dir).glob("*.onnx*")):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT can build here, and why (or why not)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt package is not installed (pip install 'voltacache[gpu]')"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "tensorrt is installed but no CUDA GPU is visible"
        return True, f"tensorrt is installed and {torch.cuda.get_device_name(0)} is visible"
    except Exception as e:  # a broken CUDA install should read as a reason, not a crash
        return False, f"CUDA is not usable ({e})"


def runtime_versions(backend: str) -> dict:
    import onnxruntime

    versions = {"onnxruntime": onnxruntime.__version__}
    if backend == "tensorrt":
        import tensorrt
        import torch

        versions["tensorrt"] = tensorrt.__version__
        versions["gpu"] = torch.cuda.get_device_name(0)
        versions["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return versions


@dataclass
class Engines:
    """Loaded engines: one runner per component, and what the pipeline needs beside them."""

    manifest: dict
    runners: dict[str, Runner]
    path: Path

    @property
    def export(self) -> dict:
        return self.manifest["export"]


def check_compatible(manifest: dict, engine_dir: Path) -> None:
    """Refuse engines built for another runtime, GPU or ONNX export."""
    backend = manifest["backend"]
    built = manifest["versions"]
    try:
        now = runtime_versions(backend)
    except ImportError as e:
        raise RebuildNeeded(f"{engine_dir}: built for {backend}, which is not usable here ({e}); rebuild") from e
    keys = ["onnxruntime"] if backend == "onnxruntime" else ["tensorrt", "compute_capability"]
    for key in keys:
        if built.get(key) != now.get(key):
            raise RebuildNeeded(
                f"{engine_dir}: built with {key} {built.get(key)}, this runtime has {now.get(key)}; "
                "rebuild with `voltacache build`"
            )
    onnx_dir = Path(manifest["onnx_dir"])
    if not onnx_dir.is_dir() or onnx_stats(onnx_dir) == manifest.get("onnx_stats"):
        return  # the export was moved away (engines stand alone), or is untouched since the build
    if onnx_fingerprint(onnx_dir) != manifest["onnx_fingerprint"]:
        built_on, now_on = calibration_id(manifest["export"]), calibration_id(onnx_dir)
        if built_on != now_on:
            raise RebuildNeeded(
                f"{engine_dir}: built from U-Nets calibrated on set {built_on or '(none: not int8)'}; the export "
                f"in {onnx_dir} is calibrated on {now_on or '(none: not int8)'}; rebuild with `voltacache build`"
            )
        raise RebuildNeeded(f"{engine_dir}: the ONNX files in {onnx_dir} changed since the build; rebuild")


def calibration_id(export: dict | Path) -> str | None:
    """The id of the calibration set an export's int8 U-Nets were calibrated on (None: not int8, or unreadable)."""
    if isinstance(export, Path):
        try:
            export = read_manifest(export)
        except VoltacacheError:
            return None
    return (export.get("calibration") or {}).get("id")


def load_engines(engine_dir: Path, cuda_graph: bool = False, components=COMPONENTS, served: bool = False) -> Engines:
    engine_dir = Path(engine_dir)
    manifest = read_engine_manifest(engine_dir)
    if not current_export(manifest["export"]):
        raise RebuildNeeded(
            f"{engine_dir}: built from an export made by an older voltacache (before step batching and SDXL); "
            "run `voltacache export` again, then `voltacache build`"
        )
    check_compatible(manifest, engine_dir)
    specs, sizes = specs_from_manifest(manifest["export"]), tuple(manifest["export"]["batch_sizes"])
    runners = {}
    for name in components:
        path = engine_dir / manifest["files"][name]
        if not path.is_file():
            raise VoltacacheError(f"{path}: engine file missing; rebuild with `voltacache build`")
        if manifest["backend"] == "tensorrt":
            runners[name] = TensorRTRunner(path, specs[name], sizes, cuda_graph=cuda_graph)
        else:
            options = {**manifest["session_options"], **(SERVED_SESSION_OPTIONS if served else {})}
            runners[name] = OnnxRuntimeRunner(path, specs[name], options, sizes=sizes)
    return Engines(manifest, runners, engine_dir)
