"""What a set of engines can do, read from its manifest, its calibration and its LoRAs: no engine is
loaded. A request is checked against it before any pixel is computed: in process before the engines
load (so a mistake is one line in a second, not after a minute of loading), and in the served denoiser.

Torch-free, like `voltacache.request`: the CLI and the served models import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequest
from ..request import SIZE_CONDITIONING, Request
from ..runtime.tokenizer import check_prompt_length


@dataclass
class Capabilities:
    export: object  # the runtime.manifests.ExportManifest the engines were built from
    calibration: object  # deepcache_calibration.ScheduleCalibration or NoScheduleCalibration
    loras: object  # lora.Loras, or the served denoiser's view of the deployment's LoRAs
    tokenizers: list = ()  # the engines' (runtime.tokenizer), to check a prompt's length; none: not checked here

    @classmethod
    def of_engines(cls, engine_dir: Path, loras: dict | None = None) -> Capabilities:
        """The engines folder's capabilities; `loras`: {name: LoraFile} a request may name."""
        from ..runtime.manifests import read_engine_manifest
        from ..runtime.tokenizer import load_tokenizers
        from .calibration import load_calibration
        from .lora import Loras

        manifest = read_engine_manifest(engine_dir)
        export = manifest.export
        calibration = load_calibration(engine_dir, export.fingerprint)
        tokenizers = load_tokenizers(engine_dir, export)
        return cls(export, calibration, Loras(loras or {}, export, backend=manifest.backend), tokenizers)

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The (height, width) sizes the engines serve, the default first."""
        return self.export.image_sizes

    @property
    def size_conditioned(self) -> bool:
        """SDXL's U-Net reads the size conditioning (its time ids)."""
        return self.export.geometry.time_ids > 0

    @property
    def inpainting_unet(self) -> bool:
        """SD 1.5 inpainting's 9-channel U-Net, which reads a mask."""
        return self.export.geometry.inpainting

    @property
    def controlnets(self) -> list[str]:
        """The names of the ControlNets the engines were exported with (export --controlnet NAME=...)."""
        return self.export.controlnets

    def check(self, request: Request) -> None:
        """What these engines cannot do for a request (its own values are checked by `request.check()`)."""
        request.check_size(self.sizes)
        given = [name for name in SIZE_CONDITIONING if getattr(request, name) is not None]
        if given and not self.size_conditioned:
            raise InvalidRequest(f"{given[0]}: size conditioning is SDXL's; this is an {self.export.family} model")
        if self.inpainting_unet and not request.inpaint:
            raise InvalidRequest(
                "mask_image: this is an inpainting model (its U-Net reads a mask); give init_image and mask_image"
            )
        if request.cache_schedule == "calibrated":
            self.calibration.check(request.steps, request.cache_interval)
        self.loras.check(request.loras)
        if request.controlled:
            if not self.controlnets:
                raise InvalidRequest(
                    "controlnets: these engines were exported without ControlNets; export with --controlnet NAME=PATH"
                )
            unknown = [name for name, _ in request.controlnets if name not in self.controlnets]
            if unknown:
                raise InvalidRequest(
                    f"controlnet {unknown[0]!r}: these engines have no ControlNet of that name; they have "
                    f"{', '.join(self.controlnets)}"
                )
        check_prompt_length(self.tokenizers, request, self.export.max_prompt_chunks)
