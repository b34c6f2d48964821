"""Loading built engines: their manifest checked against this runtime (the backend's recorded versions, the
source export), one runner per component. Torch-free and onnx-free: every served model loads through here."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import RebuildNeeded, VoltacacheError
from .backends import BACKENDS
from .cpu import cpu, has_bf16
from .manifests import EngineManifest, ExportManifest, calibration_id, read_engine_manifest
from .runners import Runner


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


@dataclass
class Engines:
    """Loaded engines: one runner per component, and what the pipeline needs beside them."""

    manifest: EngineManifest
    runners: dict[str, Runner]
    path: Path

    @property
    def export(self) -> ExportManifest:
        return self.manifest.export


def check_compatible(manifest: EngineManifest, engine_dir: Path) -> None:
    """Refuse engines built for another runtime, device or ONNX export."""
    backend = BACKENDS.get(manifest.backend)
    if backend is None:
        raise RebuildNeeded(f"{engine_dir}: built for {manifest.backend}, which this voltacache does not know; rebuild")
    ok, why = backend.available()
    if not ok:
        raise RebuildNeeded(f"{engine_dir}: built for {backend.name}, which is not usable here ({why}); rebuild")
    if manifest.inference_precision == "bf16" and not has_bf16():
        raise RebuildNeeded(
            f"{engine_dir}: built for bf16, and this CPU ({cpu()['model']}) has no bf16 instructions (AVX-512 BF16 "
            "or AMX); rebuild its export in fp32 with `voltacache export --precision fp32`, then `voltacache build`"
        )
    differs = backend.check_versions(manifest.versions)
    if differs:
        key, built, now = differs
        raise RebuildNeeded(
            f"{engine_dir}: built with {key} {built}, this runtime has {now}; rebuild with `voltacache build`"
        )
    onnx_dir = Path(manifest.onnx_dir)
    if not onnx_dir.is_dir() or onnx_stats(onnx_dir) == manifest.onnx_stats:
        return  # the export was moved away (engines stand alone), or is untouched since the build
    if onnx_fingerprint(onnx_dir) != manifest.onnx_fingerprint:
        built_on, now_on = manifest.export.calibration_id, calibration_id(onnx_dir)
        if built_on != now_on:
            raise RebuildNeeded(
                f"{engine_dir}: built from U-Nets calibrated on set {built_on or '(none: not int8)'}; the export "
                f"in {onnx_dir} is calibrated on {now_on or '(none: not int8)'}; rebuild with `voltacache build`"
            )
        raise RebuildNeeded(f"{engine_dir}: the ONNX files in {onnx_dir} changed since the build; rebuild")


def load_engines(engine_dir: Path, cuda_graph: bool = False, components=None, served: bool = False) -> Engines:
    """The engines of a folder `voltacache build` wrote, checked against this runtime, one runner per component
    (`components`: those named; None: every one, the ControlNets' too)."""
    engine_dir = Path(engine_dir)
    manifest = read_engine_manifest(engine_dir)
    check_compatible(manifest, engine_dir)
    backend, specs, sizes = BACKENDS[manifest.backend], manifest.export.specs(), manifest.export.batch_sizes
    runners = {}
    for name in manifest.files if components is None else components:
        path = engine_dir / manifest.files[name]
        if not path.is_file():
            raise VoltacacheError(f"{path}: engine file missing; rebuild with `voltacache build`")
        runners[name] = backend.load(path, specs[name], sizes, manifest, served, cuda_graph)
    return Engines(manifest, runners, engine_dir)
