"""The manifests an export and a build write, as typed artifacts: `ExportManifest` (what was exported:
model, precision, sizes, geometry, one spec per component) and `EngineManifest` (what was built from it:
backend, versions, files, and the export's manifest). Each reads and writes its JSON in one place
(`from_json` / `to_json`); a manifest of an older format is read through one default or refused in one
line. Reading them loads nothing heavy: the CLI and the served models read them before any engine loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExportError, RebuildNeeded, UsageError, VoltacacheError, read_json
from ..outputs import ENGINES, EXPORT
from ..specs import COMPONENTS, CONTROLNET_PREFIX, ComponentSpec, Geometry, is_controlnet

MANIFEST = EXPORT.marker
ENGINE_MANIFEST = ENGINES.marker
# Format 2: graphs with a dynamic row dimension (step batching) and the geometry of SDXL's inputs. Older
# graphs have a fixed row dimension, and their manifests lack what the specs now read.
EXPORT_FORMAT = 2
ENGINE_FORMAT = 1
OLDER_EXPORT = "exported by an older voltacache (before step batching and SDXL); run `voltacache export` again"


# an engines folder whose manifest cannot be read: build cannot know what it wrote there, so it will not replace it
REBUILD_ELSEWHERE = "rebuild with `voltacache build` into a new folder (build replaces only engines it can read)"


@dataclass(frozen=True)
class ComponentEntry:
    """One exported component: its spec, its file, its precision, where a LoRA's weights lie in its graph
    (None: not recorded, or int8), and what the export measured of it (errors, lint, quantization)."""

    spec: ComponentSpec
    file: str
    precision: str
    lora_targets: dict | None = None  # parameter -> [initializer, transposed, shape]
    report: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        targets = {} if self.lora_targets is None else {"lora_targets": self.lora_targets}
        return {"file": self.file, **self.spec.to_json(), "precision": self.precision, **self.report, **targets}

    @classmethod
    def from_json(cls, name: str, data: dict) -> ComponentEntry:
        known = {"file", "inputs", "outputs", "latent_sizes", "precision", "lora_targets"}
        return cls(
            spec=ComponentSpec.from_json(name, data),
            file=data.get("file", f"{name}.onnx"),
            precision=data["precision"],
            lora_targets=data.get("lora_targets"),
            report={k: v for k, v in data.items() if k not in known},
        )


@dataclass(frozen=True)
class ExportManifest:
    """What `voltacache export` wrote (manifest.json)."""

    source: str
    family: str  # "SD 1.x", "SD 2.x", "SDXL"
    zero_empty_negative: bool  # SDXL: an empty negative prompt is zeros (force_zeros_for_empty_prompt)
    scaling_factor: float  # the VAE's
    scheduler_config: dict  # the model's scheduler config, which every scheduler is built from
    model_fingerprint: str  # the weights
    fingerprint: str  # the weights and how they were compiled: what cache entries are scoped by
    precision: str  # fp16, fp32 or int8
    calibration: dict | None  # int8: what the U-Nets were calibrated on (compile.options.Calibration)
    opset: int
    batch: int  # images per request
    batch_sizes: tuple[int, ...]  # images per engine call the engines are built for
    height: int
    width: int
    deepcache_branch: str
    geometry: Geometry
    components: dict[str, ComponentEntry]
    # the U-Nets' context spans up to this many prompt chunks of CLIP's context (exports before: one)
    max_prompt_chunks: int = 1
    # the (height, width) image sizes the engines serve, (height, width) first (exports before: that one)
    sizes: tuple[tuple[int, int], ...] = ()
    versions: dict = field(default_factory=dict)
    seconds: float = 0.0
    format: int = EXPORT_FORMAT
    owned: tuple[str, ...] = ()  # the files the export wrote (voltacache.outputs)

    def specs(self) -> dict[str, ComponentSpec]:
        """The spec of every component, at the export's batch."""
        return {name: entry.spec for name, entry in self.components.items()}

    @property
    def controlnets(self) -> list[str]:
        """The names of the ControlNets exported with the model (export --controlnet NAME=...), in order."""
        return [name[len(CONTROLNET_PREFIX) :] for name in self.components if is_controlnet(name)]

    @property
    def calibration_id(self) -> str | None:
        """The id of the set the int8 U-Nets were calibrated on (None: not int8)."""
        return (self.calibration or {}).get("id")

    @property
    def size(self) -> tuple[int, int]:
        """The default image size: a request that names none gets it."""
        return self.height, self.width

    @property
    def image_sizes(self) -> tuple[tuple[int, int], ...]:
        """Every (height, width) the engines serve, the default first."""
        return self.sizes or (self.size,)

    def replace(self, **changes) -> ExportManifest:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["batch_sizes"] = list(self.batch_sizes)
        data["sizes"] = [list(size) for size in self.image_sizes]
        data["geometry"] = self.geometry.to_json()
        data["components"] = {name: entry.to_json() for name, entry in self.components.items()}
        data["owned"] = list(self.owned)
        return data

    @classmethod
    def from_json(cls, data, where: str = "manifest") -> ExportManifest:
        remedy = "give the folder `voltacache export` wrote, or run `voltacache export` again"
        components = data.get("components") if isinstance(data, dict) else None
        missing = [name for name in COMPONENTS if not isinstance((components or {}).get(name), dict)]
        if not isinstance(components, dict) or missing or "precision" not in data:
            what = f"no entry for {', '.join(missing)}" if isinstance(components, dict) and missing else "not one"
            raise ExportError(f"{where}: not a voltacache export manifest ({what}); {remedy}")
        if data.get("format", 1) < EXPORT_FORMAT or not data.get("batch_sizes"):
            raise RebuildNeeded(f"{where}: {OLDER_EXPORT}")
        try:
            fields = {f.name for f in dataclasses.fields(cls)}
            values = {k: v for k, v in data.items() if k in fields}
            values |= {
                "batch_sizes": tuple(data["batch_sizes"]),
                "geometry": Geometry.from_json(data["geometry"]),
                "components": {n: ComponentEntry.from_json(n, c) for n, c in components.items()},
                "owned": tuple(data.get("owned", ())),
                "sizes": tuple(tuple(size) for size in data.get("sizes", ())),
            }
            return cls(**values)
        except (KeyError, TypeError) as e:
            raise ExportError(f"{where}: not a voltacache export manifest ({e!r}); {remedy}") from None


@dataclass(frozen=True)
class EngineManifest:
    """What `voltacache build` wrote (engines.json): the engines of one backend, built from one export."""

    backend: str
    backend_reason: str
    versions: dict  # what the backend recorded of the runtime (and device) it was built with
    files: dict[str, str]  # component -> engine file
    export: ExportManifest
    onnx_dir: str
    onnx_fingerprint: str
    onnx_stats: dict
    session_options: dict | None = None  # ONNX Runtime's, applied wherever these engines load
    optimization_level: int | None = None  # TensorRT's builder level
    refittable: bool = False  # weights a LoRA can replace in place
    inference_precision: str | None = None  # OpenVINO's: f32, or bf16 on the CPU's bf16 units
    report: dict = field(default_factory=dict)  # per component: what the build measured (error against ONNX)
    selection: dict | None = None  # --backend auto: the CPU, each candidate's time, why this one
    seconds: float = 0.0
    format: int = ENGINE_FORMAT
    owned: tuple[str, ...] = ()

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["export"] = self.export.to_json()
        data["owned"] = list(self.owned)
        return data

    @classmethod
    def from_json(cls, data, where: str = "engines.json") -> EngineManifest:
        if not isinstance(data, dict) or not isinstance(data.get("export"), dict):
            raise RebuildNeeded(f"{where}: not an engine manifest; {REBUILD_ELSEWHERE}")
        try:
            export = ExportManifest.from_json(data["export"], where)
        except RebuildNeeded:
            raise RebuildNeeded(
                f"{where}: built from an export made by an older voltacache (before step batching and SDXL); "
                "run `voltacache export` again, then `voltacache build`"
            ) from None
        except ExportError as e:
            raise RebuildNeeded(f"{e}; rebuild with `voltacache build`") from None
        try:
            fields = {f.name for f in dataclasses.fields(cls)}
            values = {k: v for k, v in data.items() if k in fields}
            return cls(**values | {"export": export, "owned": tuple(data.get("owned", ()))})
        except TypeError as e:
            raise RebuildNeeded(f"{where}: not an engine manifest ({e}); {REBUILD_ELSEWHERE}") from None


def read_manifest(onnx_dir: Path) -> ExportManifest:
    """The manifest of an export folder; anything else is refused with the file named."""
    onnx_dir = Path(onnx_dir)
    if not onnx_dir.is_dir():
        raise ExportError(f"{onnx_dir}: no such folder; give the folder `voltacache export` wrote")
    path = onnx_dir / MANIFEST
    remedy = "give the folder `voltacache export` wrote, or run `voltacache export` again"
    try:
        return ExportManifest.from_json(read_json(path, "export manifest", remedy, ExportError), str(path))
    except RebuildNeeded as e:
        raise ExportError(str(e)) from None


def read_engine_manifest(engine_dir: Path, arg: str = "--engines") -> EngineManifest:
    """The manifest of an engines folder. A path that is no engines folder is the command line's mistake
    (exit 2, named by `arg`); a torn or older manifest asks for a rebuild."""
    engine_dir = Path(engine_dir)
    wrote = "give the folder `voltacache build` wrote"
    if not engine_dir.exists():
        raise UsageError(f"{arg} {engine_dir}: no such folder; {wrote}")
    if not engine_dir.is_dir():
        raise UsageError(f"{arg} {engine_dir}: a file, not an engines folder; {wrote}")
    path = engine_dir / ENGINE_MANIFEST
    if not path.is_file():
        raise UsageError(f"{arg} {engine_dir}: not an engines folder (no {ENGINE_MANIFEST} in it); {wrote}")
    data = read_json(path, "engine manifest", REBUILD_ELSEWHERE, RebuildNeeded)
    return EngineManifest.from_json(data, str(path))


def calibration_id(onnx_dir: Path) -> str | None:
    """The int8 calibration set of the export in a folder (None: not int8, or no readable export)."""
    try:
        return read_manifest(onnx_dir).calibration_id
    except VoltacacheError:
        return None
