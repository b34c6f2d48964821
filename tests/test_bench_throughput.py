"""The pure helpers of scripts/bench_throughput.py: no server, milliseconds."""

import argparse
import importlib.util
from collections import Counter
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_throughput.py"
spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

METRICS = """\
# HELP voltacache_ticks_total Step-batcher ticks
# TYPE voltacache_ticks_total counter
voltacache_ticks_total{model="denoiser"} 12
voltacache_tick_calls_total{call="deep",model="denoiser"} 5
voltacache_tick_calls_total{call="shallow",model="denoiser"} 7
voltacache_tick_images_total{call="deep",model="denoiser"} 15
voltacache_tick_images_total{call="shallow",model="denoiser"} 28
voltacache_tick_seconds_total{model="denoiser"} 1.5
nv_inference_count{model="denoiser",version="1"} 9
"""


def test_int_list():
    assert bench.int_list("1,2, 4") == [1, 2, 4]
    for bad in ("", "1,x", "0,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.int_list(bad)


def test_workload_is_seeded_balanced_and_distinct():
    requests = bench.workload(8, [10, 20], [1, 3], first_seed=100, shuffle_seed=0)
    assert requests == bench.workload(8, [10, 20], [1, 3], first_seed=100, shuffle_seed=0)
    assert Counter((r["cache_interval"], r["steps"]) for r in requests) == {
        (1, 10): 2,
        (1, 20): 2,
        (3, 10): 2,
        (3, 20): 2,
    }
    assert len({r["seed"] for r in requests}) == 8
    assert {r["cache_mode"] for r in requests} == {"off"} and {r["scheduler"] for r in requests} == {"ddim"}


def test_line_parser_and_counter_deltas(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # the fallback parser
    after = bench.parse_metrics(METRICS)
    assert bench.metric(after, "voltacache_tick_images_total", call="deep") == 15
    assert bench.metric(after, "voltacache_tick_images_total") == 43
    before = bench.parse_metrics('voltacache_ticks_total{model="denoiser"} 2\n')
    deltas = bench.counter_deltas(before, after)
    assert deltas["ticks"] == 10 and deltas["deep_images"] == 15  # first seen after: from 0
    assert deltas["queue_seconds"] is None  # never exported
    summary = bench.batcher_summary(deltas)
    assert summary["occupancy_deep"] == 3 and summary["occupancy_shallow"] == 4
    assert summary["mean_tick_s"] == 0.15 and summary["mean_queue_s"] is None


def test_summarize_counts_failures_and_percentiles():
    outcomes = [{"images": 1, "error": None, "seconds": s} for s in (1.0, 2.0, 3.0, 4.0)]
    outcomes.append({"images": 0, "error": "VoltacacheError: boom", "seconds": 0.1})
    row = bench.summarize(outcomes, wall_s=2.0)
    assert row["failed"] == 1 and row["errors"] == ["VoltacacheError: boom"]
    assert row["images_per_s"] == 2.0 and row["p50_s"] == 2.5
    assert row["p99_s"] == pytest.approx(3.97)
    assert bench.summarize([], 1.0)["p50_s"] is None
    level = {"concurrency": 2, "modes": {"off": row, "on": {**row, "batcher": None}}}
    assert "1/1" in bench.table([level])
