"""Running the calibration (`voltacache calibrate`): the prompts uncached, the per-step change of the
deep feature and of the output, and for each N the refresh steps whose final latents come closest to
uncached, searched from uniform N. What it writes, and how requests read it: voltacache.pipeline.calibration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..outputs import ENGINES, check_file, record_owned, staged_file
from ..runtime.manifests import read_engine_manifest
from .calibration import FORMAT, SCHEDULES_FILE
from .deepcache import FixedSchedule, relative_change, uniform_steps

DEFAULT_STEPS = (20, 50)
DEFAULT_INTERVALS = (2, 3, 4, 5)  # 50%, 33%, 25%, 20% of the steps as full calls
DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a close-up portrait of an old fisherman, dramatic lighting",
    "an isometric illustration of a tiny city with trees and cars",
)
MAX_SWEEPS = 4  # of the search; each moves every refresh by up to SEARCH_REACH steps
SEARCH_REACH = 2


def parse_counts(text: str, arg: str, low: int, example: str = "20,50") -> tuple[int, ...]:
    """`--steps 20,50` -> (20, 50)."""
    try:
        counts = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        counts = ()
    if not counts or min(counts) < low:
        raise UsageError(f"{arg} {text!r}: give whole numbers of {low} or more, separated by commas, e.g. {example}")
    return counts


def calibrate(
    engine_dir: Path,
    prompts=DEFAULT_PROMPTS,
    steps=DEFAULT_STEPS,
    intervals=DEFAULT_INTERVALS,
    scheduler: str = "ddim",
    guidance: float = 7.5,
    seed: int = 0,
    force: bool = False,
    progress=None,
) -> dict:
    """Measure the engines in `engine_dir` and write SCHEDULES_FILE there; returns what was written.
    `progress(description)` is called after every generation."""
    engine_dir = Path(engine_dir)
    target = engine_dir / SCHEDULES_FILE
    export = read_engine_manifest(engine_dir).export
    if export.geometry.inpainting:
        raise UsageError(
            f"--engines {engine_dir}: calibrate is not offered for inpainting engines (its runs are text-to-image, "
            "which their U-Net cannot do); use the uniform, nonuniform or adaptive schedule"
        )
    unusable = [n for n in intervals if all(n >= count for count in steps)]
    if unusable:
        raise UsageError(
            f"--intervals {unusable[0]}: N must be below a calibrated step count ({', '.join(map(str, steps))}): "
            "the full U-Net every N steps leaves no shallow step otherwise"
        )
    ours = lambda path: path.name in (ENGINES.owned(engine_dir) or set())  # noqa: E731
    check = dict(force=force, ours=ours, arg="--engines", what="DeepCache calibration", elsewhere="")
    check_file(target, **check)  # before the work, not after it

    from .stable_diffusion import StableDiffusion  # torch: after every check

    sd = StableDiffusion.from_engines(engine_dir)
    started = time.perf_counter()
    runs = {}
    for count in steps:
        runner = CalibrationRuns(sd, prompts, count, scheduler, guidance, seed, progress)
        run = runner.measure()
        run["schedules"], run["latent_error"] = {}, {}
        for n in (n for n in intervals if n < count):
            chosen, errors = runner.search(n)
            run["schedules"][str(n)] = chosen
            run["latent_error"][str(n)] = errors
        runs[str(count)] = run
    export = sd.export
    data = {
        "format": FORMAT,
        "fingerprint": export.fingerprint,
        "deepcache_branch": export.deepcache_branch,
        "size": [export.height, export.width],
        "scheduler": scheduler,
        "guidance": guidance,
        "seed": seed,
        "prompts": list(prompts),
        "seconds": round(time.perf_counter() - started, 1),
        "steps": runs,
    }
    with staged_file(target, **check) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    record_owned(engine_dir, ENGINES, SCHEDULES_FILE)
    return data


class CalibrationRuns:
    """The calibration prompts at one step count: their uncached trajectories, and the final latents of
    any refresh schedule to compare with them."""

    def __init__(self, sd, prompts, steps: int, scheduler: str, guidance: float, seed: int, progress=None):
        from ..request import Request
        from .stable_diffusion import Stats

        self.sd, self.steps, self.progress = sd, steps, progress or (lambda description: None)
        self.requests = [
            Request(p, steps=steps, guidance=guidance, seed=seed + k, scheduler=scheduler, cache_mode="off")
            for k, p in enumerate(prompts)
        ]
        for request in self.requests:
            sd.check(request)
        self.encoded = [sd.encode_prompt(request, Stats()) for request in self.requests]
        self.reference, self.timesteps = None, []

    def final_latents(self, refresh) -> list[np.ndarray]:
        """Every prompt under one refresh schedule, stepped together (one U-Net call per step)."""
        works = []
        for request, (embeddings, pooled) in zip(self.requests, self.encoded):
            works.append(self.sd.begin(request, embeddings, pooled))
            works[-1].schedule = FixedSchedule(refresh)
        while not works[0].done:
            for _, error in self.sd.step(works):
                raise error
        self.progress(f"{self.steps} steps")
        return [work.latents.numpy() for work in works]

    def measure(self) -> dict:
        """The uncached runs: their final latents (the reference) and how the deep feature and the
        guided noise prediction change from step to step, averaged over the prompts."""
        from ..specs import DEEP_FEATURE, NOISE_PRED, UNET_DEEP
        from .stable_diffusion import guided

        features, outputs = [], []
        for request, (embeddings, pooled) in zip(self.requests, self.encoded):
            work = self.sd.begin(request, embeddings, pooled)
            feature, output = [], []
            while not work.done:
                out = self.sd.runners[UNET_DEEP].infer(work.feeds())
                work.advance(out[NOISE_PRED], out[DEEP_FEATURE])
                feature.append(out[DEEP_FEATURE])
                output.append(guided(out[NOISE_PRED], request.guidance))
            features.append(changes(feature))
            outputs.append(changes(output))
            self.timesteps = [float(t) for t in work.timesteps]
            self.progress(f"{self.steps} steps")
        self.reference = self.final_latents(range(len(self.timesteps)))
        return {
            "timesteps": self.timesteps,
            "feature_change": np.round(np.mean(features, axis=0), 6).tolist(),
            "output_change": np.round(np.mean(outputs, axis=0), 6).tolist(),
        }

    def error(self, refresh) -> float:
        finals = self.final_latents(refresh)
        return float(np.mean([np.mean((a - b) ** 2) for a, b in zip(finals, self.reference)]))

    def search(self, interval: int) -> tuple[list[int], dict]:
        """The refresh steps, as many as uniform N spends, whose final latents are closest to uncached."""
        n = len(self.timesteps)
        chosen = uniform_steps(n, interval)
        best = uniform = self.error(chosen)
        for _ in range(MAX_SWEEPS):
            moved = False
            for k in range(1, len(chosen)):
                low = chosen[k - 1] + 1
                high = chosen[k + 1] - 1 if k + 1 < len(chosen) else n - 1
                for step in range(max(low, chosen[k] - SEARCH_REACH), min(high, chosen[k] + SEARCH_REACH) + 1):
                    if step == chosen[k]:
                        continue
                    candidate = [*chosen[:k], step, *chosen[k + 1 :]]
                    error = self.error(candidate)
                    if error < best:
                        chosen, best, moved = candidate, error, True
            if not moved:
                break
        return chosen, {"uniform": uniform, "calibrated": best}


def changes(values: list[np.ndarray]) -> list[float]:
    """The relative change of each step's value from the step before (0 for the first)."""
    return [0.0] + [relative_change(b, a) for a, b in zip(values, values[1:])]
