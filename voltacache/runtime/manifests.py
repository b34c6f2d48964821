"""Reading the manifests an export and a build write, without loading anything heavy: the CLI, the
served models and the runtime read them before any engine loads.

The export's `manifest.json` says what was exported (model, precision, sizes, geometry, one spec per
component); the engines' `engines.json` says what was built from it (backend, versions, files) and
carries the export manifest under "export".
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ExportError, RebuildNeeded, UsageError, read_json
from ..outputs import ENGINES, EXPORT
from ..specs import COMPONENTS, ComponentSpec

MANIFEST = EXPORT.marker
ENGINE_MANIFEST = ENGINES.marker
# Format 2: graphs with a dynamic row dimension (step batching) and the geometry of SDXL's inputs. Older
# graphs have a fixed row dimension, and their manifests lack what the specs now read.
EXPORT_FORMAT = 2
OLDER_EXPORT = "exported by an older voltacache (before step batching and SDXL); run `voltacache export` again"


def current_export(manifest: dict) -> bool:
    return manifest.get("format", 1) >= EXPORT_FORMAT and bool(manifest.get("batch_sizes"))


def read_manifest(onnx_dir: Path) -> dict:
    """The manifest of an export folder; anything else is refused with the file named."""
    onnx_dir = Path(onnx_dir)
    if not onnx_dir.is_dir():
        raise ExportError(f"{onnx_dir}: no such folder; give the folder `voltacache export` wrote")
    path = onnx_dir / MANIFEST
    remedy = "give the folder `voltacache export` wrote, or run `voltacache export` again"
    manifest = read_json(path, "export manifest", remedy, ExportError)
    components = manifest.get("components") if isinstance(manifest, dict) else None
    missing = [name for name in COMPONENTS if not isinstance((components or {}).get(name), dict)]
    if not isinstance(components, dict) or missing or "precision" not in manifest:
        what = f"no entry for {', '.join(missing)}" if isinstance(components, dict) and missing else "not one"
        raise ExportError(f"{path}: not a voltacache export manifest ({what}); {remedy}")
    if not current_export(manifest):
        raise ExportError(f"{path}: {OLDER_EXPORT}")
    return manifest


def specs_from_manifest(manifest: dict) -> dict[str, ComponentSpec]:
    return {name: ComponentSpec.from_json(name, entry) for name, entry in manifest["components"].items()}


def read_engine_manifest(engine_dir: Path, arg: str = "--engines") -> dict:
    """The manifest of an engines folder. A path that is no engines folder is the command line's mistake
    (exit 2, named by `arg`); a torn manifest asks for a rebuild."""
    engine_dir = Path(engine_dir)
    wrote = "give the folder `voltacache build` wrote"
    if not engine_dir.exists():
        raise UsageError(f"{arg} {engine_dir}: no such folder; {wrote}")
    if not engine_dir.is_dir():
        raise UsageError(f"{arg} {engine_dir}: a file, not an engines folder; {wrote}")
    if not (engine_dir / ENGINE_MANIFEST).is_file():
        raise UsageError(f"{arg} {engine_dir}: not an engines folder (no {ENGINE_MANIFEST} in it); {wrote}")
    manifest = read_json(
        engine_dir / ENGINE_MANIFEST, "engine manifest", "rebuild with `voltacache build`", RebuildNeeded
    )
    if not isinstance(manifest, dict) or not isinstance(manifest.get("export"), dict):
        raise RebuildNeeded(f"{engine_dir / ENGINE_MANIFEST}: not an engine manifest; rebuild with `voltacache build`")
    return manifest
