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

from ..errors import InvalidRequest, VoltacacheError
from ..outputs import ENGINES

SCHEDULES_FILE = "deepcache_schedules.json"
FORMAT = 1


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
