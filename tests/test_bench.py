"""The throughput plan `voltacache bench` derives from per-size U-Net times (docs/benchmarks.md)."""

import pytest

from voltacache.bench import step_batching_plan

SIZES = (1, 2, 4, 8)


def times(deep, shallow):
    return {"unet_deep": {n: deep(n) for n in SIZES}, "unet_shallow": {n: shallow(n) for n in SIZES}}


def test_without_deepcache_one_request_runs_the_full_unet_every_step():
    plan = step_batching_plan(times(lambda n: 0.01 * n, lambda n: 0.001 * n), interval=1, steps=50)
    assert plan[1] == pytest.approx(1 / (0.01 * 50))


def test_per_image_cost_constant_batching_gains_nothing():
    plan = step_batching_plan(times(lambda n: 0.01 * n, lambda n: 0.001 * n), interval=1, steps=10)
    assert plan[8] == pytest.approx(plan[1])


def test_fixed_cost_calls_scale_with_occupancy_and_deepcache_mixes_the_two_calls():
    plan = step_batching_plan(times(lambda n: 0.01, lambda n: 0.002), interval=1, steps=10)
    assert plan[8] == pytest.approx(8 * plan[1])
    # N = 3, 3 in flight, evenly staggered: every tick one refresh (deep) and two shallow steps
    plan = step_batching_plan(times(lambda n: 0.01, lambda n: 0.002), interval=3, steps=10)
    assert plan[4] > plan[2] > plan[1]


def test_a_call_between_built_sizes_pays_for_the_next_size():
    t = times(lambda n: 0.01 * n, lambda n: 0.0)
    t["unet_deep"] = {1: 0.01, 4: 0.04}
    t["unet_shallow"] = {1: 0.0, 4: 0.0}
    # N = 2, 4 in flight: every tick two refresh, run at size 4 (padded), as a TensorRT profile does
    assert step_batching_plan(t, interval=2, steps=1)[4] == pytest.approx(4 / 0.04)
