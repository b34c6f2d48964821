import math

import numpy as np
import pytest

from voltacache.pipeline.deepcache import AdaptiveSchedule, full_steps


@pytest.mark.parametrize("steps, interval", [(20, 1), (20, 2), (20, 3), (50, 5), (7, 10)])
@pytest.mark.parametrize("schedule", ["uniform", "nonuniform"])
def test_full_step_count(steps, interval, schedule):
    chosen = full_steps(steps, interval, schedule)
    assert len(chosen) == math.ceil(steps / interval)
    assert 0 in chosen and max(chosen) < steps


def test_uniform_is_every_nth():
    assert sorted(full_steps(10, 3)) == [0, 3, 6, 9]


def test_nonuniform_is_densest_around_center():
    chosen = sorted(full_steps(50, 5, "nonuniform", center=15))
    gaps = [b - a for a, b in zip(chosen, chosen[1:])]
    near = [g for a, g in zip(chosen, gaps) if 8 <= a <= 22]
    far = [g for a, g in zip(chosen, gaps) if a >= 30]
    assert max(near) < min(far)


def test_bad_schedule():
    with pytest.raises(ValueError, match="interval 0"):
        full_steps(10, 0)
    with pytest.raises(ValueError, match="unknown DeepCache schedule"):
        full_steps(10, 2, "random")


def growing(steps: int, rate: float = 0.1):
    """Latents that change by `rate` (relative L1) from each step to the next."""
    return [np.full((1, 4, 8, 8), (1 + rate) ** k, np.float32) for k in range(steps)]


def test_adaptive_refreshes_first_and_when_the_summed_change_crosses():
    schedule = AdaptiveSchedule(0.25)
    refreshed = [k for k, latents in enumerate(growing(10)) if schedule.due(k, latents)]
    assert refreshed == [0, 3, 6, 9]  # 0.1 a step: the sum reaches 0.3 >= 0.25 on every third step


@pytest.mark.parametrize("threshold, expected", [(0.0, list(range(6))), (100.0, [0])])
def test_adaptive_extremes(threshold, expected):
    schedule = AdaptiveSchedule(threshold)
    assert [k for k, latents in enumerate(growing(6)) if schedule.due(k, latents)] == expected


def test_adaptive_answers_the_same_when_asked_again_on_a_step():
    schedule, latents = AdaptiveSchedule(0.15), growing(4)
    answers = [(schedule.due(k, x), schedule.due(k, x)) for k, x in enumerate(latents)]
    assert all(first == again for first, again in answers)
    assert [k for k, (first, _) in enumerate(answers) if first] == [0, 2]
