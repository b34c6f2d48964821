import math

import pytest

from voltacache.deepcache import full_steps


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
