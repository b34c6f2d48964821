"""What ControlNets add to one request's steps, as diffusers' ControlNet pipelines compute it, over prebuilt
engines: each ControlNet is an engine of its own (controlnet_NAME) and its residuals are inputs of the U-Net
engines, so a ControlNet is a request's choice, not a rebuild.

With DeepCache, a full step runs the ControlNets with unet_deep; a shallow step needs only the residuals of the
shallow U-Net's own skips: the last full step's are reused (the ControlNets run on full steps only) or, with
`control_residuals="fresh"`, the ControlNets run again. A request without ControlNets on engines exported with
them feeds zero residuals: the sum diffusers adds is then exactly the U-Net's own.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ..images import fit_image
from ..specs import CONTROL_IMAGE, CONTROL_SCALE, SAMPLE, controlnet_component


def control_image(image: np.ndarray, width: int, height: int, rows: int) -> np.ndarray:
    """uint8 (h, w, 3) -> the ControlNet's input: resized to the image (Lanczos), [0, 1] NCHW, a copy per U-Net row
    (diffusers' control image processor: RGB, no normalization; the guidance pair's two rows)."""
    pixels = fit_image(image, width, height).astype(np.float32) / 255.0
    return np.ascontiguousarray(np.repeat(pixels.transpose(2, 0, 1)[None], rows, axis=0))


def active_steps(steps: int, start: float, end: float) -> list[bool]:
    """Whether the ControlNets act on each of `steps` steps: diffusers' controlnet_keep (control_guidance_start/end)."""
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


@dataclass
class Control:
    """One request's ControlNets: their runners, control images (a row per U-Net row) and scales, the steps they
    act on, and the last full step's residuals (what a shallow step reuses)."""

    runners: dict  # component name -> runner, in the request's order
    images: list[np.ndarray]
    scales: list[float]
    active: list[bool]  # per step of the request's run
    reuse: bool
    last: dict | None = field(default=None, repr=False)  # the last full step's summed residuals (None: inactive)

    @classmethod
    def of(cls, request, runners: dict, size, rows: int, steps: int, skipped: int = 0) -> Control:
        """The request's ControlNets over `runners` (the engines), for images of `size` (height, width) and a run of
        `steps` steps after `skipped` (the approximate cache's start): the range counts from the first."""
        height, width = size
        # names the engines have: Capabilities.check refused the others
        engines = {controlnet_component(name): runners[controlnet_component(name)] for name, _ in request.controlnets}
        images = [control_image(request.control_image(i), width, height, rows) for i in range(len(engines))]
        active = active_steps(steps + skipped, request.control_start, request.control_end)[skipped:]
        scales = [float(scale) for _, scale in request.controlnets]
        return cls(engines, images, scales, active, request.control_residuals == "reuse")

    def jobs(self, index: int, full: bool, sample: np.ndarray, feeds: dict) -> list[tuple[str, object, dict]]:
        """The ControlNet calls step `index` needs, (component, runner, inputs) each, in the request's order: none on
        an inactive step or a shallow one that reuses the last full step's residuals. `sample`: the scaled latents
        (the guidance pair's rows); `feeds`: the U-Net's, whose timestep, context and SDXL conditions they share."""
        needed = full or not self.reuse or self.last is None
        if not self.active[index] or not needed:
            return []
        found = []
        for (name, runner), image, scale in zip(self.runners.items(), self.images, self.scales):
            shared = {k: v for k, v in feeds.items() if k in runner.spec.input_names}
            scales = np.full(len(sample), scale, np.float32)
            found.append((name, runner, {**shared, SAMPLE: sample, CONTROL_IMAGE: image, CONTROL_SCALE: scales}))
        return found

    def residuals(self, index: int, full: bool, outputs: list[dict], wanted) -> dict[str, np.ndarray]:
        """The residuals the U-Net call of step `index` takes (`wanted`: its residual inputs' specs), from the
        outputs of this step's `jobs` (summed in the request's order, as diffusers sums them) or the last full
        step's."""
        if not self.active[index]:
            return {}
        if outputs:
            summed = {}
            for out in outputs:
                summed = {k: summed[k] + v if k in summed else v for k, v in out.items()}
            if full:
                self.last = summed
        else:
            summed = self.last
        return {t.name: summed[t.name] for t in wanted}


def run_jobs(jobs: list[list[tuple[str, object, dict]]], stats: list) -> list[list[dict]]:
    """Every work's ControlNet jobs (`jobs[i]`, counted in `stats[i]`), one call per ControlNet runner over the
    rows of every work that runs it: the outputs, per work in its jobs' order."""
    groups = defaultdict(list)
    for i, work_jobs in enumerate(jobs):
        for j, (name, runner, inputs) in enumerate(work_jobs):
            groups[id(runner)].append((i, j, name, runner, inputs))
    outputs = [[None] * len(work_jobs) for work_jobs in jobs]
    for group in groups.values():
        _, _, name, runner, first = group[0]
        started = time.perf_counter()
        out = runner.infer({k: np.concatenate([g[4][k] for g in group]) for k in first})
        seconds = time.perf_counter() - started
        rows = np.cumsum([len(g[4][SAMPLE]) for g in group])[:-1]
        parts = {k: np.split(v, rows) for k, v in out.items()}
        for n, (i, j, *_) in enumerate(group):
            outputs[i][j] = {k: v[n] for k, v in parts.items()}
            stats[i].seconds[name] += seconds
            stats[i].controlnet_calls += 1
    return outputs


def residual_feeds(wanted, rows: int, given: dict) -> dict[str, np.ndarray]:
    """A U-Net call's residual inputs (`wanted`: their specs): those `given`, zeros for the rest."""
    return {t.name: given[t.name] if t.name in given else np.zeros((rows, *t.shape[1:]), t.dtype) for t in wanted}
