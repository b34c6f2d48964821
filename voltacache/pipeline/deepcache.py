"""DeepCache schedules: on which denoising steps the full U-Net runs and refreshes the deep feature.

- uniform: every N-th step (0, N, 2N, ...).
- nonuniform (DeepCache, Ma et al. 2024, sec. 3.3): the same number of full steps, ceil(T / N), placed
  densest around a `center` step and spread by a power law `power`: step = center + sign(x) |x|^power
  for x evenly spaced between -(center)^(1/power) and (T - 1 - center)^(1/power).
- calibrated (block caching, Wimbauer et al. 2024): the same number of full steps, placed where
  `voltacache calibrate` measured that a stale deep feature costs the most (voltacache.calibration).
- adaptive (after TeaCache, Liu et al. 2024): refresh when the U-Net's input, accumulated since the
  last refresh, has changed by more than a threshold; the number of full steps follows the request.
Step 0 is always full: there is no feature yet.
"""

from __future__ import annotations

import math

import numpy as np

FIXED_SCHEDULES = ("uniform", "nonuniform")  # a function of the step count and N alone


def uniform_steps(steps: int, interval: int) -> list[int]:
    return list(range(0, steps, interval))


def nonuniform_steps(steps: int, interval: int, center: int | None = None, power: float = 1.4) -> list[int]:
    n_full = math.ceil(steps / interval)
    if n_full >= steps:
        return list(range(steps))
    center = steps // 3 if center is None else center
    center = min(max(center, 0), steps - 1)
    while power > 1.0:
        x = np.linspace(-(center ** (1 / power)), (steps - 1 - center) ** (1 / power), n_full)
        chosen = sorted({0, *(int(center + np.sign(v) * abs(v) ** power) for v in x)})
        if len(chosen) >= n_full:
            return chosen[:1] + _spread(chosen[1:], n_full - 1)
        power -= 0.05  # too clustered to give n_full distinct steps: flatten the law
    return uniform_steps(steps, interval)


def _spread(candidates: list[int], k: int) -> list[int]:
    """k of the sorted candidates, evenly picked (keeps the density profile)."""
    if k <= 0:
        return []
    picks = np.linspace(0, len(candidates) - 1, k).round().astype(int)
    return [candidates[i] for i in sorted(set(picks))]


def full_steps(
    steps: int, interval: int, schedule: str = "uniform", center: int | None = None, power: float = 1.4
) -> set[int]:
    """The steps that run unet_deep under a fixed schedule; every other step runs unet_shallow on the
    cached feature."""
    if interval < 1:
        raise ValueError(f"cache interval {interval}: must be >= 1")
    if schedule == "uniform":
        return set(uniform_steps(steps, interval))
    if schedule == "nonuniform":
        return set(nonuniform_steps(steps, interval, center, power))
    raise ValueError(f"unknown DeepCache schedule {schedule!r}; use {' or '.join(FIXED_SCHEDULES)}")


def relative_change(new: np.ndarray, old: np.ndarray) -> float:
    """Mean absolute change relative to the mean magnitude (TeaCache's relative L1)."""
    return float(np.abs(new - old).mean() / max(float(np.abs(old).mean()), 1e-12))


class FixedSchedule:
    """Refresh on a set of steps chosen before the run (uniform, nonuniform, calibrated)."""

    def __init__(self, refresh):
        self.refresh = frozenset(refresh)

    def due(self, index: int, latents) -> bool:
        return index in self.refresh


class AdaptiveSchedule:
    """Refresh on the first step, and on every step where the latents the U-Net is about to read have
    changed, in relative L1 summed over the steps since the last refresh, by `threshold` or more.

    The U-Net's input is known before the step, so the step it crosses on is the one refreshed (TeaCache's
    indicator is an input too). The guided output was measured as the indicator first: it changes little
    while the deep feature is stale, so it refreshed late (docs/benchmarks.md)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.accumulated = 0.0
        self.previous = None
        self.decided: dict[int, bool] = {}  # this step's answer: `due` is asked more than once per step

    def due(self, index: int, latents) -> bool:
        if index not in self.decided:
            latents = np.asarray(latents)
            first = self.previous is None
            if not first:
                self.accumulated += relative_change(latents, self.previous)
            self.previous = latents
            refresh = first or self.accumulated >= self.threshold
            if refresh:
                self.accumulated = 0.0
            self.decided = {index: refresh}
        return self.decided[index]
