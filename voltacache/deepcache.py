"""DeepCache schedules: on which denoising steps the full U-Net runs and refreshes the deep feature.

Uniform: every N-th step (0, N, 2N, ...). Non-uniform (DeepCache, Ma et al. 2024, sec. 3.3): the
same number of full steps, ceil(T / N), placed densest around a `center` step and spread by a
power law `power`: step = center + sign(x) |x|^power for x evenly spaced between
-(center)^(1/power) and (T - 1 - center)^(1/power). Step 0 is always full: there is no feature yet.
"""

from __future__ import annotations

import math

import numpy as np


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
    """The steps that run unet_deep; every other step runs unet_shallow on the cached feature."""
    if interval < 1:
        raise ValueError(f"cache interval {interval}: must be >= 1")
    if schedule == "uniform":
        return set(uniform_steps(steps, interval))
    if schedule == "nonuniform":
        return set(nonuniform_steps(steps, interval, center, power))
    raise ValueError(f"unknown DeepCache schedule {schedule!r}; use uniform or nonuniform")
