"""LoRA on built engines: no export, no rebuild.

A LoRA file (.safetensors, diffusers/PEFT or kohya layout) is read with diffusers' own loader
(`lora_state_dict`, which converts kohya and older diffusers layouts) and merged by PEFT's LoRA
layers exactly as `fuse_lora(lora_scale=...)` merges it, but on zero weights: that gives each
layer's change. The export recorded where each Linear and Conv weight of the text encoders and the
U-Net lies in its ONNX graph (`lora_targets` in the manifest: the initializer, and whether it is
stored transposed, as the exporter folds a Linear's weight). A variant is the base engines with
those initializers replaced: a new ONNX Runtime session over the same file, handed the replacements
as it loads the weights kept beside the graph, or a TensorRT engine refitted. The base engines are
never changed, so a request without LoRA runs exactly what it ran before.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadConfiguration, InvalidRequest, UsageError
from ..request import LORA_NAME, MAX_LORAS, LoraRequest
from ..specs import TEXT_ENCODER, UNET_DEEP, UNET_SHALLOW

LORA_COMPONENTS = (TEXT_ENCODER, UNET_DEEP, UNET_SHALLOW)  # the components whose weights a LoRA changes
LORA_PREFIXES = ("unet", "text_encoder", "text_encoder_2")  # diffusers' prefixes: the exported modules' too
RESIDENT_VARIANTS = 2  # LoRA variants a pipeline keeps loaded, besides the base engines
REGISTRY = "loras.json"  # a deployment's registered LoRAs, in its `loras` folder


def registrations(options: list[str], arg: str = "--lora") -> dict[str, LoraFile]:
    """`deploy --lora NAME=FILE ...` -> {name: LoraFile}, each file checked now."""
    registered = {}
    for option in options:
        name, sep, path = option.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{arg} {option!r}: give NAME=FILE, e.g. {arg} style=style.safetensors")
        if name in registered:
            raise UsageError(f"{arg} {name}: registered twice; give each name once")
        registered[name] = LoraFile.open(name, Path(path), f"{arg} {option}:")
    return registered


def lora_options(options: list[str], files: bool) -> tuple[dict[str, LoraFile], tuple[LoraRequest, ...]]:
    """`--lora FILE[:SCALE]` (in process: each file named by its stem) or `--lora NAME[:SCALE]` (a server's
    registered LoRA) -> ({name: LoraFile} to open, the request's LoraRequests)."""
    opened, loras = {}, []
    for option in options:
        lora = LoraRequest.parse(option)
        head, sep, tail = option.rpartition(":")
        named = Path(head).is_file() if files else bool(LORA_NAME.fullmatch(head))
        if lora.name == option and sep and named and not (files and Path(option).is_file()):
            what = "FILE" if files else "NAME"
            raise UsageError(f"--lora {option}: scale {tail!r} is not a number; give {what}:SCALE, e.g. {head}:0.8")
        if files:
            path = Path(lora.name)
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem).lstrip("_.-")[:60] or "lora"
            name = name if name not in opened else f"{name}-{len(opened)}"
            opened[name] = LoraFile.open(name, path)
            lora = lora._replace(name=name)
        loras.append(lora)
    return opened, tuple(loras)


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    digest: str  # the file's sha256: variants and cache entries are keyed by what it holds, not its name

    @classmethod
    def open(cls, name: str, path: Path, arg: str = "--lora") -> LoraFile:
        """`arg`: how the error names the option."""
        path = Path(path)
        if not LORA_NAME.fullmatch(name):
            raise UsageError(f"{arg} {name}: a LoRA name is letters, digits, '_', '.' or '-' (at most 64)")
        if not path.is_file():
            raise UsageError(f"{arg} {path}: no such file; give a LoRA .safetensors file")
        if path.suffix != ".safetensors":
            raise UsageError(f"{arg} {path}: only .safetensors LoRA files are read (a pickle runs code); convert it")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        return cls(name, path, digest.hexdigest())


def read_registry(folder: Path) -> dict[str, LoraFile]:
    """{name: LoraFile} of a deployment's registered LoRAs: folder/REGISTRY and the files beside it."""
    import json

    folder = Path(folder)
    entries = json.loads((folder / REGISTRY).read_text()) if (folder / REGISTRY).is_file() else {}
    return {name: LoraFile(name, folder / entry["file"], entry["sha256"]) for name, entry in entries.items()}


def lora_changes(path: Path, family: str, scale: float) -> dict[str, torch.Tensor]:  # noqa: F821
    """Each weight's change under the LoRA at `scale`, keyed as the exported modules name their
    parameters ("unet.down_blocks.0.attentions.0.proj_in.weight", "text_encoder.encoder...")."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    loader = StableDiffusionXLPipeline if family == "SDXL" else StableDiffusionPipeline
    try:
        state_dict, alphas, metadata = loader.lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as e:  # safetensors' and diffusers' own errors: a torn or foreign file
        raise UsageError(f"{path}: not a LoRA file diffusers can read ({e})") from None
    unknown = sorted({k.split(".")[0] for k in state_dict} - set(LORA_PREFIXES))
    if unknown or not state_dict:
        found = ", ".join(unknown[:2]) + (", ..." if len(unknown) > 2 else "")
        raise UsageError(
            f"{path}: no LoRA layers diffusers maps onto a Stable Diffusion U-Net or text encoder ({found})"
        )
    changes = {}
    for prefix in LORA_PREFIXES:
        layers = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        if layers:
            meta = {k.removeprefix(f"{prefix}."): v for k, v in (metadata or {}).items() if k.startswith(f"{prefix}.")}
            for name, change in merged_changes(path, prefix, layers, alphas, meta or None, scale).items():
                changes[canonical(f"{prefix}.{name}")] = change
    return changes


def canonical(param: str) -> str:
    """A parameter's name without CLIP's `text_model.` level, which older transformers (and kohya files) have."""
    return param.replace(".text_model.", ".", 1)


def merged_changes(path, prefix: str, layers: dict, alphas, metadata, scale: float) -> dict:
    """diffusers' load_lora_adapter / load_lora_into_text_encoder, then fuse_lora, on a model of only the
    LoRA's layers with zero weights: what fusing adds to each weight."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config  # diffusers' own, as its loaders build the config
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    unet = prefix == "unet"
    if unet:
        layers = layers if any("lora_A" in k for k in layers) else convert_unet_state_dict_to_peft(layers)
    else:
        layers = convert_state_dict_to_peft(convert_state_dict_to_diffusers(layers))
    odd = [k for k in layers if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd:
        raise UsageError(f"{path}: {odd[0]}: only plain LoRA layers (lora_A/lora_B) are applied, not DoRA or biases")
    rank = {f"^{k}" if unet else k: v.shape[1] for k, v in layers.items() if k.endswith("lora_B.weight")}
    alphas = {k.removeprefix(f"{prefix}."): v for k, v in (alphas or {}).items() if k.startswith(f"{prefix}.")}
    model = zero_layers(layers)
    config = _create_lora_config(layers, alphas or None, metadata, rank, is_unet=unet)
    inject_adapter_in_model(config, model, adapter_name="lora")
    set_peft_model_state_dict(model, layers, adapter_name="lora")
    changes = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                if scale != 1.0:
                    module.scale_layer(scale)  # what fuse_lora(lora_scale=...) does before merging
                module.merge(adapter_names=["lora"])
                changes[f"{name}.weight"] = module.get_base_layer().weight.detach().clone()
    return changes


def zero_layers(layers: dict) -> torch.nn.Module:  # noqa: F821
    """A module tree holding, at each LoRA layer's path, a zero Linear or Conv2d of the layer's shape."""
    import torch
    from torch import nn
    from torch.nn.utils import skip_init

    root = nn.Module()
    for key, down in layers.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removesuffix(".lora_A.weight")
        up = layers.get(f"{path}.lora_B.weight")
        if up is None:
            raise UsageError(f"LoRA layer {path}: lora_A without lora_B; the file is incomplete")
        # skip_init: no random init to throw away (SD 1.5's layers hold hundreds of millions of weights)
        if down.ndim == 4:
            layer = skip_init(nn.Conv2d, down.shape[1], up.shape[0], tuple(down.shape[2:]), bias=False)
        else:
            layer = skip_init(nn.Linear, down.shape[1], up.shape[0], bias=False)
        nn.init.zeros_(layer.weight)
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer.to(torch.float32))
    return root


def export_targets(module, program) -> dict[str, list]:
    """At export, with the module and its traced program in hand: where each Linear and Conv weight a
    LoRA may change lies in the graph, {parameter: [initializer, transposed, parameter's shape]}.

    Most weights keep their parameter's name; the exporter folds each Linear's weight into a
    transposed constant with a generated name, found by its value (weights of trained or random
    models are unique; one shared by two parameters is left out, as no LoRA could change one alone)."""
    from torch import nn

    initializers = {name: v.const_value for name, v in program.model.graph.initializers.items()}
    wanted = {
        f"{name}.weight": m.weight.detach()
        for name, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name.split(".")[0] in LORA_PREFIXES
    }
    targets = {}
    for param, weight in list(wanted.items()):
        value = initializers.get(param)
        if value is not None and tuple(value.shape) == tuple(weight.shape):
            targets[canonical(param)] = [param, False, list(weight.shape)]
            del wanted[param]
    by_digest = {}
    for name, value in initializers.items():
        if value is not None and name not in targets and len(value.shape) == 2:
            by_digest.setdefault(_digest(value.numpy()), []).append(name)
    for param, weight in wanted.items():
        if weight.ndim != 2:
            continue
        found = by_digest.get(_digest(weight.T.contiguous().numpy()), [])
        if len(found) == 1:
            targets[canonical(param)] = [found[0], True, list(weight.shape)]
    return targets


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes() + str(array.shape).encode()).hexdigest()


def new_weights(changes: list[dict], targets: dict[str, list], base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The replaced initializers of one component: its `base` values plus each LoRA's change, added in the
    order given (as diffusers fuses adapters one after another), in the initializer's dtype and layout."""
    values = {}
    for change in changes:
        for param, delta in change.items():
            if param in targets:
                name, transposed, _ = targets[param]
                current = values.get(name, base[name])
                delta = delta.numpy().T if transposed else delta.numpy()
                if current.dtype == np.float32:
                    values[name] = current + delta  # what fuse_lora computes, to the bit
                else:  # fp16 engines: added in fp32, stored in the engine's dtype
                    values[name] = (current.astype(np.float32) + delta).astype(current.dtype)
    return values


def touched(changes: list[dict], targets: dict[str, list]) -> set[str]:
    """The initializers of one component that `changes` replace."""
    return {targets[param][0] for change in changes for param in change if param in targets}


class Loras:
    """The LoRA files a pipeline (or a deployment) applies by name, and the variants of its engines that
    are resident: the most recently used `resident` ones, each a set of runners."""

    def __init__(self, files: dict[str, LoraFile], export, resident: int = RESIDENT_VARIANTS, backend: str = ""):
        """`export`: the engines' ExportManifest; `backend`: theirs (runtime.backends), whose row says whether
        a LoRA can swap its weights."""
        self.files, self.export, self.resident, self.backend = dict(files), export, resident, backend
        self.targets = {n: export.components[n].lora_targets for n in LORA_COMPONENTS}
        self.variants: OrderedDict[tuple, dict] = OrderedDict()
        self.changes: dict[tuple, dict] = {}  # (digest, scale) -> changes, for the resident variants
        self.switches, self.switch_seconds, self.last_switch_seconds = 0, 0.0, 0.0

    def check(self, loras: tuple) -> None:
        """Every named LoRA is registered, and these engines recorded where its weights lie."""
        for name, _ in loras:
            if name not in self.files:
                known = ", ".join(sorted(self.files)) or "none"
                raise InvalidRequest(f"lora {name!r}: not registered here (registered: {known})")
        if loras:
            self.check_engines()

    def check_engines(self) -> None:
        """Whether these engines can take a LoRA at all."""
        from ..runtime.backends import BACKENDS

        if self.backend in BACKENDS and BACKENDS[self.backend].lora == "never":
            raise InvalidRequest(
                f"lora: {self.backend} engines cannot swap their weights; build with --backend onnxruntime for LoRA"
            )
        if self.export.precision == "int8":
            raise InvalidRequest("lora: not on int8 engines (their weights are quantized); export fp16 or fp32")
        if not all(self.targets.values()):
            raise InvalidRequest(
                "lora: these engines come from an export that did not record its LoRA targets; "
                "run `voltacache export` and `voltacache build` again"
            )

    def key(self, loras: tuple) -> tuple:
        """What a variant (and a cache entry) depends on: each file's content and scale, in order."""
        return tuple((self.files[name].digest[:16], float(scale)) for name, scale in loras)

    def runners(self, loras: tuple, base: dict) -> dict:
        """The runners of `loras` applied to `base`: the resident variant, or a new one (the least
        recently used is dropped beyond `resident`)."""
        if not loras:
            return base
        key = self.key(loras)
        if key in self.variants:
            self.variants.move_to_end(key)
            return self.variants[key]
        started = time.perf_counter()
        changes = [self._changes(name, scale) for name, scale in loras]
        variant = dict(base)
        for component in LORA_COMPONENTS:
            runner = base.get(component)
            if runner is None:
                continue
            names = touched(changes, self.targets[component])
            if names:
                weights = new_weights(changes, self.targets[component], runner.initializers(names))
                variant[component] = runner.with_initializers(weights)
        self.variants[key] = variant
        while len(self.variants) > self.resident:
            self.variants.popitem(last=False)
        self.last_switch_seconds = time.perf_counter() - started
        self.switches += 1
        self.switch_seconds += self.last_switch_seconds
        return variant

    def _changes(self, name: str, scale: float) -> dict:
        lora = self.files[name]
        key = (lora.digest, float(scale))
        if key not in self.changes:
            changes = lora_changes(lora.path, self.export.family, float(scale))
            shapes = {param: target[2] for targets in self.targets.values() for param, target in targets.items()}
            missing = sorted(set(changes) - set(shapes))
            if missing:
                raise UsageError(
                    f"lora {name} ({lora.path}): {len(missing)} of its layers are not in these engines, first "
                    f"{missing[0]}: a LoRA for another model or architecture"
                )
            for param, change in changes.items():
                if list(change.shape) != shapes[param]:
                    raise UsageError(
                        f"lora {name} ({lora.path}): layer {param} is {list(change.shape)}, these engines' weight is "
                        f"{shapes[param]}: a LoRA for another architecture"
                    )
            self.changes[key] = changes
            if len(self.changes) > 4 * MAX_LORAS:
                self.changes.pop(next(iter(self.changes)))
        return self.changes[key]

    @classmethod
    def from_registry(cls, folder: Path, export, resident: int = RESIDENT_VARIANTS, backend: str = "") -> Loras:
        """The LoRAs a deployment registered (voltacache deploy --lora)."""
        return cls(read_registry(folder), export, resident, backend)

    def write_registry(self, folder: Path) -> None:
        """Copy every LoRA file into `folder` (the deployment's own copy: a file changed later changes
        nothing served) and list them with what they change."""
        import json
        import shutil

        folder.mkdir(parents=True, exist_ok=True)
        entries = {}
        for name, lora in self.files.items():
            shutil.copyfile(lora.path, folder / f"{name}.safetensors")
            entries[name] = {"file": f"{name}.safetensors", "sha256": lora.digest, "components": self.components(name)}
        (folder / REGISTRY).write_text(json.dumps(entries, indent=2))

    def components(self, name: str) -> list[str]:
        """The components whose weights a registered LoRA changes; a LoRA that cannot apply to these
        engines is refused here (deploy checks each one when it is registered)."""
        try:
            self.check_engines()
            changes = self._changes(name, 1.0)
        except UsageError as e:
            raise BadConfiguration(f"--lora {name}: {e}") from None
        return [c for c in LORA_COMPONENTS if touched([changes], self.targets[c] or {})]
