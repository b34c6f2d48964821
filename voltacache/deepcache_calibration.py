"""Calibrated DeepCache schedules: measure once where the full U-Net calls pay, then spend each
request's calls there (block caching's automatic schedule, Wimbauer et al., CVPR 2024).

`calibrate` runs a few prompts uncached, and records how much the deep feature and the guided
noise prediction change from step to step. Then, for each interval N, it searches for the
ceil(steps / N) refresh steps whose final latents are closest to the uncached ones over those
prompts (mean squared error). The search is coordinate descent from uniform N: it moves one
refresh at a time while the error falls, so the schedule it writes is never worse than uniform on
the calibration prompts.

The measured changes alone did not place refreshes well. A dynamic program over how far each
step's output moves on an older feature lost to uniform (docs/benchmarks.md), because an early
error also changes the trajectory that every later step sees.

Requests choose `cache_schedule="calibrated"` with an interval N that was calibrated. Steps are
matched by timestep value, so a calibration serves every scheduler, as well as img2img's tail of
the schedule and the approximate cache's late starts, at the calibrated step counts.

The file lives in the engines folder and names the export it was measured on. Another model's
file, or another DeepCache split's, is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .deepcache import FixedSchedule, relative_change, uniform_steps
from .errors import InvalidRequest, UsageError, VoltacacheError
from .manifests import read_engine_manifest
from .outputs import ENGINES, check_file, record_owned, staged_file
from .specs import Geometry

SCHEDULES_FILE = "deepcache_schedules.json"
FORMAT = 1
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


class CalibrationError(VoltacacheError):
    """A schedules file that cannot serve: missing, corrupt or measured on other engines."""


@dataclass
class ScheduleCalibration:
    fingerprint: str
    id: str  # what a cache entry of a calibrated request is scoped by: a new calibration changes images
    steps: dict  # str(step count) -> {"timesteps": [...], "schedules": {str(N): [refresh steps]}, ...}
    engines: Path | None = None  # the engines folder it lives in (its advice names it)

    def advice(self, steps: int, interval: int) -> str:
        """The calibrate command that adds `steps` and `interval` and keeps what is calibrated now."""
        counts = sorted({int(s) for s in self.steps} | {steps})
        ns = sorted({int(n) for run in self.steps.values() for n in run["schedules"]} | {interval})
        command = (
            f"voltacache calibrate --engines {self.engines} --steps {','.join(map(str, counts))} "
            f"--intervals {','.join(map(str, ns))}"
        )
        if SCHEDULES_FILE in (ENGINES.owned(self.engines) or set()):
            return f"run `{command} --force`, or use uniform"
        return f"calibrate did not write {SCHEDULES_FILE} in these engines: move it out, then run `{command}`"

    @classmethod
    def read(cls, path: Path, fingerprint: str) -> ScheduleCalibration:
        remedy = recalibrate(path.parent)
        try:
            text = path.read_text()
            data = json.loads(text)
            runs = data["steps"]
            ok = data.get("format") == FORMAT and all(
                0 in chosen and max(chosen) < len(run["timesteps"])
                for run in runs.values()
                for chosen in run["schedules"].values()
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CalibrationError(f"{path}: not a readable DeepCache calibration ({e}); {remedy}") from None
        if not ok:
            raise CalibrationError(f"{path}: not a DeepCache calibration of this version; {remedy}")
        if data["fingerprint"] != fingerprint:
            raise CalibrationError(f"{path}: calibrated on another model or DeepCache split; {remedy}")
        return cls(fingerprint, hashlib.sha256(text.encode()).hexdigest()[:16], runs, path.parent)

    def check(self, steps: int, interval: int) -> None:
        run = self.steps.get(str(steps))
        if run is None:
            have = ", ".join(sorted(self.steps, key=int))
            raise InvalidRequest(
                f"cache_schedule calibrated: these engines are calibrated for {have} steps, not {steps}; "
                + self.advice(steps, interval)
            )
        if str(interval) not in run["schedules"]:
            have = ", ".join(sorted(run["schedules"], key=int))
            raise InvalidRequest(
                f"cache_interval {interval}: calibrated for N = {have} at {steps} steps; "
                + self.advice(steps, interval)
            )

    def refreshes(self, steps: int, timesteps, interval: int) -> set[int]:
        """The full steps of a run over `timesteps` of a `steps`-step schedule: the calibrated refreshes,
        each on the run's step nearest its timestep, and the run's first step (no feature yet)."""
        self.check(steps, interval)
        run = self.steps[str(steps)]
        times = np.asarray([float(t) for t in timesteps])
        chosen = (run["timesteps"][i] for i in run["schedules"][str(interval)])
        return {0} | {int(np.abs(times - t).argmin()) for t in chosen if t <= times[0]}


class NoScheduleCalibration:
    """What a pipeline holds when its engines have no usable calibration: calibrated requests are
    refused with why (everything else serves)."""

    def __init__(self, reason: str):
        self.reason = reason
        self.id = None

    def check(self, steps: int, interval: int) -> None:
        raise InvalidRequest(f"cache_schedule calibrated: {self.reason}")

    def refreshes(self, steps: int, timesteps, interval: int) -> set[int]:
        self.check(steps, interval)


def recalibrate(engine_dir: Path) -> str:
    """What to do about the engines' calibration file, as `calibrate` will accept it: replace it with
    --force where calibrate wrote it, else move it out first (calibrate replaces only what it wrote)."""
    if SCHEDULES_FILE in (ENGINES.owned(engine_dir) or set()):
        return f"run `voltacache calibrate --engines {engine_dir} --force`"
    return (
        f"voltacache calibrate did not write it in these engines: move it out of {engine_dir}, then run "
        f"`voltacache calibrate --engines {engine_dir}`"
    )


def load_calibration(engine_dir: Path, fingerprint: str) -> ScheduleCalibration | NoScheduleCalibration:
    path = Path(engine_dir) / SCHEDULES_FILE
    if not path.is_file():
        return NoScheduleCalibration(
            f"these engines have no calibration; run `voltacache calibrate --engines {engine_dir}`"
        )
    try:
        return ScheduleCalibration.read(path, fingerprint)
    except CalibrationError as e:
        return NoScheduleCalibration(str(e))


def carry_calibrations(earlier: Path, owned: set[str], stage: Path, fingerprint: str) -> None:
    """A rebuild keeps the engines' calibrations (outputs.Carry): the current one when it was measured on
    the export being built, else set aside under a name that says why (never deleted, the user told);
    those set aside before stay as they are."""
    import shutil
    import warnings

    for rel in sorted(r for r in owned if r.startswith("deepcache_schedules") and r.endswith(".json")):
        name = rel
        if rel == SCHEDULES_FILE:
            try:
                measured_on = json.loads((earlier / rel).read_text())["fingerprint"]
                why = None if measured_on == fingerprint else f"other-export-{str(measured_on)[:12]}"
            except (OSError, ValueError, KeyError, TypeError):
                why = f"unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
            if why is not None:
                name = f"deepcache_schedules.{why}.json"
                for n in range(1, 1000):
                    if name not in owned:
                        break
                    name = f"deepcache_schedules.{why}-{n}.json"
                warnings.warn(
                    f"{earlier / rel}: measured on another export than the one built now; kept as "
                    f"{earlier / name}; run `voltacache calibrate --engines {earlier}` for these engines",
                    stacklevel=2,
                )
        shutil.copy2(earlier / rel, stage / name)


def parse_counts(text: str, arg: str, low: int) -> tuple[int, ...]:
    """`--steps 20,50` -> (20, 50)."""
    try:
        counts = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        counts = ()
    if not counts or min(counts) < low:
        raise UsageError(f"{arg} {text!r}: give whole numbers of {low} or more, separated by commas, e.g. 20,50")
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
    export = read_engine_manifest(engine_dir)["export"]
    if Geometry(**export["geometry"]).inpainting:
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
    check = dict(force=force, ours=ours, arg="--engines", what="DeepCache calibration")
    check_file(target, **check)  # before the work, not after it

    from .pipeline import StableDiffusion  # torch: after every check

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
        "fingerprint": export["fingerprint"],
        "deepcache_branch": export["deepcache_branch"],
        "size": [export["height"], export["width"]],
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
        from .pipeline import Stats
        from .request import Request

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
        from .pipeline import guided
        from .specs import DEEP_FEATURE, NOISE_PRED, UNET_DEEP

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
