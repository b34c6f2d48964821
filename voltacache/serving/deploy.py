"""Write a Triton model repository from an engines folder.

Every config.pbtxt is built as Triton's own ModelConfig protobuf (tritonclient ships it) from the
specs in voltacache.serving.protocol, printed in text format, and parsed back before it is
written: a config Triton would reject never reaches the disk.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from importlib import resources
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ..cache.layers import CacheSettings
from ..errors import UsageError, VoltacacheError
from ..outputs import REPOSITORY, refuse_overlap, staged_output
from ..pipeline.lora import LORA_COMPONENTS, RESIDENT_VARIANTS, Loras, read_registry
from ..runtime.backends import BACKENDS
from ..runtime.manifests import read_engine_manifest
from ..runtime.runners import WEIGHTS_INSIDE
from ..specs import TEXT_ENCODER, ComponentSpec
from . import protocol as p

TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8",
    "object": "TYPE_STRING",
}
# Which adapter in triton_models/ serves each Python model.
ADAPTERS = {
    p.TOKENIZER: "tokenizer",
    p.DENOISER: "denoiser",
    p.POSTPROCESS: "postprocess",
    p.CACHE_SEARCH: "cache_search",
}
# python: every engine through the runtime (voltacache.runtime) in a Python model, what the CPU server has;
# or Triton's own backend of the engines' kind (the NGC container's), where the backend table names one
COMPONENT_BACKENDS = ("python", *(name for name, b in BACKENDS.items() if b.triton))
DENOISER_INSTANCES = 2  # without step batching: requests denoised in parallel
MAX_DENOISER_INSTANCES = 32  # each is a process holding a pipeline; more than the cores only contend


def dims(t, rows: str) -> list[int]:
    """`rows`: "static" (the spec's shape), "any" (the first dimension is -1: engines that run any number
    of images) or "batched" (without it: Triton's dynamic batcher stacks requests along it)."""
    shape = list(t.shape)
    return {"static": shape, "any": [-1, *shape[1:]], "batched": shape[1:]}[rows]


def model_config(spec: ComponentSpec, rows: str = "static", max_batch_size: int = 0, **fields) -> mc.ModelConfig:
    config = mc.ModelConfig(name=spec.name, max_batch_size=max_batch_size, **fields)
    optional = p.optional_inputs(spec)
    config.input.extend(
        mc.ModelInput(name=t.name, data_type=TRITON_DTYPES[t.dtype], dims=dims(t, rows), optional=t.name in optional)
        for t in spec.inputs
    )
    config.output.extend(
        mc.ModelOutput(name=t.name, data_type=TRITON_DTYPES[t.dtype], dims=dims(t, rows)) for t in spec.outputs
    )
    return config


def python_config(spec: ComponentSpec, engines: Path, instances: int = 1, **fields) -> mc.ModelConfig:
    config = model_config(spec, backend="python", **fields)
    config.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances))
    config.parameters["engines"].string_value = str(engines.resolve())
    return config


def ensemble_config(spec: ComponentSpec, steps: list[tuple[str, dict, dict]]) -> mc.ModelConfig:
    """steps: (model, {model input: ensemble tensor}, {model output: ensemble tensor})."""
    config = model_config(spec, platform="ensemble")
    for model, inputs, outputs in steps:
        config.ensemble_scheduling.step.append(
            mc.ModelEnsembling.Step(model_name=model, model_version=-1, input_map=inputs, output_map=outputs)
        )
    return config


def ensemble_steps(specs: dict, img2img: bool, inpaint: bool = False, loras: bool = False) -> list:
    """tokenizer -> text_encoder -> denoiser (BLS: U-Nets, VAE) -> postprocess, wired by tensor name.

    The denoiser's outputs reach postprocess under a prefix: postprocess reports them, or, for a
    response from Triton's cache, an exact hit with nothing computed (serving/protocol.py). With
    `loras` (the deployment registers some), the tokenizer's LORA_ROWS reach the text encoder's LORAS:
    it encodes the prompt with the request's LoRAs."""
    same = lambda items: {t.name: t.name for t in items}  # noqa: E731
    text_encoder, denoiser, postprocess = specs[TEXT_ENCODER], specs[p.DENOISER], specs[p.POSTPROCESS]
    tokenized = [t for t in specs[p.TOKENIZER].outputs if loras or t.name != p.LORA_ROWS]
    encoder_inputs = {**same(text_encoder.inputs), **({p.LORAS: p.LORA_ROWS} if loras else {})}
    denoiser_inputs = [
        t
        for t in denoiser.inputs
        if (img2img or t.name not in p.IMAGE_INPUTS)
        and (inpaint or t.name not in p.MASK_INPUTS)
        and t.name not in p.DIRECT_NAMES
    ]
    denoiser_outputs = [t for t in denoiser.outputs if t.name not in p.DIRECT_NAMES]
    denoised = {t.name: p.DENOISED + t.name for t in denoiser_outputs if t.name != p.COMPUTED_NS}
    return [
        (p.TOKENIZER, same(specs[p.TOKENIZER].inputs), same(tokenized)),
        (TEXT_ENCODER, encoder_inputs, same(text_encoder.outputs)),
        (p.DENOISER, same(denoiser_inputs), {**same(denoiser_outputs), **denoised}),
        (p.POSTPROCESS, {**same(postprocess.inputs), **denoised}, same(postprocess.outputs)),
    ]


def write_config(folder: Path, config: mc.ModelConfig) -> None:
    text = text_format.MessageToString(config)
    parsed = text_format.Parse(text, mc.ModelConfig())  # Triton's own schema: raises on anything invalid
    if parsed != config:
        raise VoltacacheError(f"{folder.name}: config does not survive a round trip through ModelConfig")
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text)


def install_adapter(folder: Path, adapter: str) -> None:
    source = resources.files("triton_models") / adapter / "model.py"
    (folder / "1" / "model.py").write_text(source.read_text())


def deploy(
    engines: Path,
    repo: Path,
    component_backend: str = "python",
    denoiser_instances: int | None = None,
    cache: CacheSettings = CacheSettings(),
    step_batching: bool = True,
    loras: dict | None = None,
    lora_resident: int | None = None,
    drop_loras: tuple[str, ...] = (),
) -> Path:
    """Write the repository; returns its path. `component_backend`: python (ONNX Runtime in a Python
    model: the CPU server), onnxruntime (the NGC container's backend) or tensorrt (.plan engines).

    `step_batching`: one denoiser batches the U-Net steps of every request in flight
    (voltacache.pipeline.batching) and the text encoder batches requests with Triton's dynamic batcher;
    without it, `denoiser_instances` denoisers (default 2) each run one request at a time.

    `loras`: {name: LoraFile} a request may name (each checked against the engines now, and copied into
    the repository), added to those the repository registered before (a name given again takes the new
    file; `drop_loras` unregisters); the component models keep `lora_resident` variants loaded (default 2).

    `repo` must be new, empty, or a repository `deploy` wrote (voltacache.json at its root): that one
    is generated output and is replaced (the files deploy wrote), once the new one is complete; anything
    else found in it is refused, as is a repository that is, holds or lies inside the engines folder.
    """
    from .server import check_servable_path, servers_of

    engines, repo = Path(engines), Path(repo)
    refuse_overlap(repo, engines, "--repo", "--engines", inside=True)
    check_servable_path(repo, "--repo")
    manifest = read_engine_manifest(engines)
    if step_batching and denoiser_instances not in (None, 1):
        raise UsageError(
            f"--denoiser-instances {denoiser_instances}: with step batching one denoiser serves every request in "
            "flight; add --no-step-batching for per-request denoisers"
        )
    if denoiser_instances is not None and not 1 <= denoiser_instances <= MAX_DENOISER_INSTANCES:
        raise UsageError(f"--denoiser-instances {denoiser_instances}: use 1 to {MAX_DENOISER_INSTANCES}")
    if component_backend not in COMPONENT_BACKENDS:
        raise UsageError(f"--component-backend {component_backend!r}: use one of {', '.join(COMPONENT_BACKENDS)}")
    if component_backend != "python" and component_backend != manifest.backend:
        native = f" or give {manifest.backend}" if manifest.backend in COMPONENT_BACKENDS else ""
        raise UsageError(
            f"--component-backend {component_backend}: {engines} holds {manifest.backend} engines; drop the "
            f"option (python serves any engines){native}"
        )
    for option, where in (("--cache", cache.index), ("--blob-store", cache.blob_store)):
        if where and "://" not in where and Path(os.path.abspath(repo)) in Path(os.path.abspath(where)).parents:
            raise UsageError(
                f"{option} {where}: inside --repo {repo}, which a new deploy replaces whole; keep the cache outside it"
            )
    registered = registered_loras(repo, drop_loras)
    files = {**registered, **(loras or {})}
    registry = Loras(files, manifest.export, lora_resident or RESIDENT_VARIANTS, manifest.backend)
    if lora_resident is not None and not registry.files:
        raise UsageError("--lora-resident: only with LoRAs to keep resident; register them with --lora NAME=FILE")
    if registry.files:
        if component_backend != "python":
            raise UsageError(
                f"--lora: LoRA variants are served by the python component backend, not {component_backend}"
            )
        if not 1 <= registry.resident <= 16:
            raise UsageError(f"--lora-resident {lora_resident}: keep 1 to 16 variants loaded")
        for name in registry.files:
            registry.check(((name, 1.0),))
            try:  # a LoRA these engines cannot take is refused now, not per request
                registry.components(name)
            except UsageError as e:
                if name not in registered or name in (loras or {}):
                    raise
                raise UsageError(
                    f"{e}; it was registered in --repo {repo} before: --drop-lora {name} unregisters it"
                ) from None
        inside = [f for n, f in manifest.files.items() if n in LORA_COMPONENTS and f.endswith(".onnx")]
        inside = [f for f in inside if not (Path(engines) / (f + ".data")).is_file()]
        if inside:  # built before ONNX Runtime engines kept their weights beside the graph
            raise UsageError(f"--lora: {Path(engines) / inside[0]} {WEIGHTS_INSIDE}")
    with staged_output(repo, REPOSITORY, force=True, arg="--repo") as stage:
        instances = 1 if step_batching else denoiser_instances or DENOISER_INSTANCES
        _write_repository(engines, stage, manifest, component_backend, instances, cache, step_batching, registry)
    for server in servers_of(repo):
        warnings.warn(
            f"tritonserver pid {server.pid} serves --repo {repo} with the models it loaded before; restart its "
            "`voltacache serve` to serve this deployment",
            stacklevel=2,
        )
    return repo


def registered_loras(repo: Path, drop: tuple[str, ...] = ()) -> dict:
    """The LoRAs a repository `deploy` wrote has registered ({name: LoraFile}), but those in `drop`."""
    registered = {}
    if REPOSITORY(repo):
        registered = read_registry(repo / p.LORA_FOLDER)
    unknown = [name for name in drop if name not in registered]
    if unknown:
        have = ", ".join(sorted(registered)) or "none"
        raise UsageError(f"--drop-lora {unknown[0]}: not registered in --repo {repo} (registered: {have})")
    return {name: lora for name, lora in registered.items() if name not in drop}


def _write_repository(
    engines: Path,
    repo: Path,
    manifest: dict,
    component_backend: str,
    denoiser_instances: int,
    cache: CacheSettings,
    step_batching: bool,
    loras: Loras,
) -> None:
    export = manifest.export
    specs = p.serving_specs(export)
    for name in export.components:  # the model's, then each ControlNet's
        folder, source = repo / name, engines / manifest.files[name]
        # the engines run any number of images (voltacache.runtime.runners); the text encoder, fed by the
        # ensemble one request at a time, has Triton stack concurrent requests into one call
        batched = step_batching and name == TEXT_ENCODER
        # (a row per chunk of each text: runtime.tokenizer)
        most = 2 * max(export.batch_sizes) * export.max_prompt_chunks
        shape = dict(rows="batched", max_batch_size=most) if batched else dict(rows="any")
        if component_backend == "python":
            config, target = python_config(specs[name], engines, **shape), None
        else:  # Triton's own backend for these engines (voltacache.runtime.backends)
            native = BACKENDS[component_backend].triton
            config, target = model_config(specs[name], **native["config"], **shape), native["file"]
        if batched:
            config.dynamic_batching.SetInParent()
        if name == TEXT_ENCODER:  # the text-embedding memo: the same ids skip the encoder (Triton's LRU cache)
            config.response_cache.enable = True
        if loras.files and name in LORA_COMPONENTS:  # which LoRAs to apply: "name:scale" per row
            lora_dims = [-1] if batched else [-1, -1]
            config.input.append(mc.ModelInput(name=p.LORAS, data_type="TYPE_STRING", dims=lora_dims, optional=True))
            config.parameters[p.LORA_RESIDENT].string_value = str(loras.resident)
        write_config(folder, config)
        if target is None:
            install_adapter(folder, "component")
            continue
        shutil.copy2(source, folder / "1" / target)
        if source.with_name(source.name + ".data").exists():
            shutil.copy2(source.with_name(source.name + ".data"), folder / "1" / (source.name + ".data"))
    if cache.index is not None and "://" not in cache.index and denoiser_instances > 1:
        # a milvus-lite file opens in one process only: parallel denoisers need a Milvus server URL
        warnings.warn(f"cache index {cache.index} is a milvus-lite file: one denoiser instance", stacklevel=2)
        denoiser_instances = 1
    for name, adapter in ADAPTERS.items():
        instances = denoiser_instances if name == p.DENOISER else 1
        config = python_config(specs[name], engines, instances)
        if name == p.DENOISER:
            config.response_cache.enable = True  # an exact repeat is answered from Triton's cache
            config.parameters[p.STEP_BATCHING].string_value = "on" if step_batching else "off"
        if name in (p.DENOISER, p.CACHE_SEARCH):  # cache_search: which embedder reads the query
            for key, value in cache.parameters().items():
                config.parameters[key].string_value = value
        if name == p.DENOISER and loras.files:
            config.parameters[p.LORA_RESIDENT].string_value = str(loras.resident)
        write_config(repo / name, config)
        install_adapter(repo / name, adapter)
    if loras.files:
        loras.write_registry(repo / p.LORA_FOLDER)
    with_loras = bool(loras.files)
    txt2img = ensemble_steps(specs, img2img=False, loras=with_loras)
    write_config(repo / p.TXT2IMG, ensemble_config(specs[p.TXT2IMG], txt2img))
    img2img = ensemble_steps(specs, img2img=True, loras=with_loras)
    write_config(repo / p.IMG2IMG, ensemble_config(specs[p.IMG2IMG], img2img))
    inpaint = ensemble_steps(specs, img2img=True, inpaint=True, loras=with_loras)
    write_config(repo / p.INPAINT, ensemble_config(specs[p.INPAINT], inpaint))
    (repo / p.REPOSITORY_MARKER).write_text(
        json.dumps({"engines": str(engines.resolve()), "component_backend": component_backend}, indent=2)
    )
