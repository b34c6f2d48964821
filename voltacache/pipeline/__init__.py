"""Generation: the denoising pipeline over runners (`StableDiffusion`, torch and diffusers' schedulers),
what a request may ask of a set of engines (capabilities), DeepCache's schedules and their calibration,
LoRA variants, and the step batcher that runs many requests' steps in shared engine calls.

`from voltacache.pipeline import StableDiffusion` works without importing torch for the package's
torch-free modules: the name is resolved on first use.
"""

from __future__ import annotations

_LAZY = {"StableDiffusion", "Generation", "Stats", "Work", "Inpainting"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import stable_diffusion

        return getattr(stable_diffusion, name)
    raise AttributeError(f"module 'voltacache.pipeline' has no attribute {name!r}")
