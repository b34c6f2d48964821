"""Serving throughput under concurrent clients: the step-batching denoiser against per-request denoisers.

    .venv/bin/python scripts/bench_throughput.py --engines build/bench/tiny/engines_block_64 \
        --concurrency 1,2,4,8,16 --steps 10,20 --label tiny

The same engines are deployed twice and both servers run at once (an idle one costs no CPU):
- on: one denoiser batches the U-Net steps of every request in flight (`deploy(step_batching=True)`);
- off: today's deployment, `deploy`'s default number of denoiser instances, one request each.
For each concurrency c, c client threads (a gRPC client each) pull requests from a shared queue. The
two modes run back to back, the one that goes first alternating per level, so that both see the same
machine state. The workload is fixed and seeded: a balanced mix of DeepCache intervals and step
counts, DDIM, cache_mode "off" and a distinct seed per request (Triton's response cache never answers).

Per mode and level: images per second (images / wall seconds), p50 and p99 request latency, failed
requests; for the step batcher, from its Prometheus counters over the level: mean images per U-Net
call (occupancy, deep and shallow), mean tick seconds and mean queue seconds of a request.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import queue
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from voltacache.benchmark import free_port, machine, save_figure, write_json

MODES = ("off", "on")  # step_batching False / True
PROMPTS = [
    "a photo of an astronaut riding a horse",
    "a lighthouse on a cliff at sunset",
    "a fox in a snowy forest",
    "a bowl of ripe peaches, oil painting",
    "a city street at night in the rain",
    "a castle above the clouds",
]
# The step batcher's counters (voltacache/serving/python_models.py, Metrics.tick): (name, labels)
COUNTERS = {
    "ticks": ("voltacache_ticks_total", {}),
    "tick_seconds": ("voltacache_tick_seconds_total", {}),
    "deep_calls": ("voltacache_tick_calls_total", {"call": "deep"}),
    "shallow_calls": ("voltacache_tick_calls_total", {"call": "shallow"}),
    "deep_images": ("voltacache_tick_images_total", {"call": "deep"}),
    "shallow_images": ("voltacache_tick_images_total", {"call": "shallow"}),
    "queue_seconds": ("voltacache_queue_seconds_total", {}),
    "queued_requests": ("voltacache_queued_requests_total", {}),
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


# --- pure helpers (tests/test_bench_throughput.py) ---


def int_list(text: str) -> list[int]:
    """ "1,2,4" -> [1, 2, 4]; each at least 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers of at least 1")
    return values


def workload(count: int, steps: list[int], intervals: list[int], first_seed: int, shuffle_seed: int) -> list[dict]:
    """`count` requests: every (interval, steps) pair equally often, in a seeded order, a seed each."""
    pairs = list(itertools.product(intervals, steps))
    mix = [pairs[i % len(pairs)] for i in range(count)]
    random.Random(shuffle_seed).shuffle(mix)
    return [
        dict(
            prompt=PROMPTS[i % len(PROMPTS)],
            seed=first_seed + i,
            steps=n_steps,
            cache_interval=interval,
            scheduler="ddim",
            cache_mode="off",
        )
        for i, (interval, n_steps) in enumerate(mix)
    ]


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text format -> {(sample name, sorted label pairs): value}."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        samples = {}
        for line in text.splitlines():
            match = _SAMPLE.match(line.strip())
            if match and not line.startswith("#"):
                name, labels, value = match.groups()
                pairs = tuple(sorted((k, v.replace('\\"', '"')) for k, v in _LABEL.findall(labels or "")))
                samples[name, pairs] = float(value)
        return samples
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels) -> float | None:
    """Sum of the samples of `name` whose labels include `labels`; None if there is none."""
    values = [v for (n, pairs), v in samples.items() if n == name and set(labels.items()) <= set(pairs)]
    return sum(values) if values else None


def counter_deltas(before: dict, after: dict) -> dict[str, float | None]:
    """Each of COUNTERS over the interval; a counter first seen after it started from 0; None if absent."""
    deltas = {}
    for key, (name, labels) in COUNTERS.items():
        start, end = metric(before, name, **labels), metric(after, name, **labels)
        deltas[key] = None if end is None else end - (start or 0.0)
    return deltas


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def batcher_summary(deltas: dict) -> dict:
    """Mean images per U-Net call (occupancy), mean tick and queue seconds, from counter deltas."""
    return {
        "occupancy_deep": ratio(deltas["deep_images"], deltas["deep_calls"]),
        "occupancy_shallow": ratio(deltas["shallow_images"], deltas["shallow_calls"]),
        "mean_tick_s": ratio(deltas["tick_seconds"], deltas["ticks"]),
        "mean_queue_s": ratio(deltas["queue_seconds"], deltas["queued_requests"]),
        "counters": deltas,
    }


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(outcomes: list[dict], wall_s: float) -> dict:
    """images/s, latency percentiles and failures of one mode at one level."""
    ok = [o for o in outcomes if o["error"] is None]
    latencies = [o["seconds"] for o in ok]
    images = sum(o["images"] for o in ok)
    return {
        "requests": len(outcomes),
        "failed": len(outcomes) - len(ok),
        "errors": sorted({o["error"] for o in outcomes if o["error"] is not None}),
        "images": images,
        "wall_s": wall_s,
        "images_per_s": images / wall_s if wall_s > 0 else None,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "latencies_s": latencies,
    }


def fmt(value: float | None, spec: str = ".2f", width: int = 7) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def table(levels: list[dict]) -> str:
    """One row per concurrency level: both modes side by side."""
    head = (
        f"{'conc':>4} {'img/s off':>9} {'img/s on':>9} {'on/off':>7} {'p50 off':>8} {'p50 on':>8} "
        f"{'p99 off':>8} {'p99 on':>8} {'occ deep':>8} {'occ shal':>8} {'failed':>7}"
    )
    rows = [head]
    for level in levels:
        off, on = level["modes"]["off"], level["modes"]["on"]
        batcher = on.get("batcher") or {}
        failed = f"{off['failed']}/{on['failed']}"
        rows.append(
            f"{level['concurrency']:>4} {fmt(off['images_per_s'], '.2f', 9)} {fmt(on['images_per_s'], '.2f', 9)} "
            f"{fmt(ratio(on['images_per_s'], off['images_per_s']), '.2f')} "
            f"{fmt(off['p50_s'], '.3f', 8)} {fmt(on['p50_s'], '.3f', 8)} "
            f"{fmt(off['p99_s'], '.3f', 8)} {fmt(on['p99_s'], '.3f', 8)} "
            f"{fmt(batcher.get('occupancy_deep'), '.2f', 8)} {fmt(batcher.get('occupancy_shallow'), '.2f', 8)} "
            f"{failed:>7}"
        )
    return "\n".join(rows)


# --- the run ---


def scrape(url: str) -> dict:
    """The server's metrics; {} if they cannot be read (reported as None, not a failure)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return parse_metrics(response.read().decode())
    except Exception as e:
        print(f"warning: metrics at {url} unreadable ({e})", file=sys.stderr)
        return {}


def make_progress(total: int, description: str):
    """A tqdm bar's update, or a no-op without tqdm; and its close."""
    try:
        from tqdm import tqdm
    except ImportError:
        return (lambda: None), (lambda: None)
    bar = tqdm(total=total, desc=description, unit="req", leave=False, file=sys.stderr)
    return (lambda: bar.update(1)), bar.close


def run_requests(url: str, requests: list[dict], concurrency: int, description: str) -> tuple[list[dict], float]:
    """`requests` over `concurrency` client threads pulling from one queue: (outcome per request, wall s).
    A failed request is an outcome with its error; Ctrl-C stops the workers taking new requests."""
    from voltacache.serving.client import Client

    todo: queue.Queue = queue.Queue()
    for request in requests:
        todo.put(request)
    outcomes: list[dict] = []
    lock, stop = threading.Lock(), threading.Event()
    advance, close_bar = make_progress(len(requests), description)

    def worker():
        client = None
        try:
            client = Client(url)
            while not stop.is_set():
                try:
                    request = todo.get_nowait()
                except queue.Empty:
                    return
                fields = {k: v for k, v in request.items() if k != "prompt"}
                started = time.perf_counter()
                try:
                    images = client.generate(request["prompt"], **fields).images
                    outcome = {"images": int(images.shape[0]), "error": None}
                except Exception as e:  # counted and reported, never the end of the run
                    outcome = {"images": 0, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                outcome.update(seconds=time.perf_counter() - started, steps=request["steps"])
                outcome["cache_interval"] = request["cache_interval"]
                with lock:
                    outcomes.append(outcome)
                advance()
        except Exception as e:  # the client itself failed: the requests it would have taken fail with it
            print(f"warning: client thread failed: {e}", file=sys.stderr)
        finally:
            if client is not None:
                client.client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)  # in steps, so that Ctrl-C reaches the main thread
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        close_bar()
    wall = time.perf_counter() - started
    while not todo.empty():  # requests no thread took (every client failed) are failures too
        request = todo.get_nowait()
        outcomes.append({"images": 0, "error": "not sent: no client", "seconds": 0.0, "steps": request["steps"]})
    return outcomes, wall


def server_errors(server) -> list[str]:
    # logged by every start of the CPU build, not by anything the benchmark did
    noise = ("CudaDriverHelper has not been initialized", "CUDA driver version is insufficient")
    return [text for _, text in server.log_messages("E") if not any(n in text for n in noise)]


def figure(levels: list[dict], path: Path, label: str) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (`make bench` installs it): no figure", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrency = [level["concurrency"] for level in levels]
    fig, (rate, latency) = plt.subplots(1, 2, figsize=(10, 4))
    names = {"off": "per-request denoisers", "on": "step batching"}
    for mode in MODES:
        rows = [level["modes"][mode] for level in levels]
        nan = lambda v: float("nan") if v is None else v  # noqa: E731
        rate.plot(concurrency, [nan(r["images_per_s"]) for r in rows], marker="o", label=names[mode])
        latency.plot(concurrency, [nan(r["p50_s"]) for r in rows], marker="o", label=names[mode])
    for axis, ylabel in ((rate, "images / s"), (latency, "p50 latency (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrency, [str(c) for c in concurrency])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
    rate.set_title(f"Throughput ({label})")
    latency.set_title(f"Latency ({label})")
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--concurrency", type=int_list, default=[1, 2, 4, 8, 16], help="client threads per level")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default max(2c, 8))")
    parser.add_argument("--steps", type=int_list, default=[10, 20], help="step counts of the mix")
    parser.add_argument("--intervals", type=int_list, default=[1, 3], help="DeepCache intervals of the mix")
    parser.add_argument("--warmup", type=int, default=4, help="untimed requests per server first")
    parser.add_argument(
        "--latency-repeats", type=int, default=0, help="first, one request at a time alternating: its latency, on/off"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the order of the mix")
    parser.add_argument("--label", default="tiny")
    parser.add_argument("--out", type=Path, default=None, help="default build/results/throughput_<label>.json")
    parser.add_argument("--figure", type=Path, default=None, help="default build/figures/throughput_<label>.png")
    args = parser.parse_args()
    args.out = args.out or Path(f"build/results/throughput_{args.label}.json")
    args.figure = args.figure or Path(f"build/figures/throughput_{args.label}.png")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests: at least 1")

    from voltacache.errors import VoltacacheError
    from voltacache.serving.deploy import DENOISER_INSTANCES as instances
    from voltacache.serving.deploy import deploy
    from voltacache.serving.server import TritonServer

    export = json.loads((args.engines / "engines.json").read_text()).get("export", {})
    print(
        f"engines {args.engines}: batch sizes {export.get('batch_sizes', [export.get('batch')])}; "
        f"off = {instances} denoiser instances (deploy's default), on = one step-batching denoiser"
    )
    levels, errors = [], {}
    try:
        with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
            servers = {}
            for mode in MODES:
                repo = deploy(args.engines, Path(tmp) / f"repo_{mode}", step_batching=mode == "on")
                ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
                servers[mode] = stack.enter_context(TritonServer(repo, **ports))
            warm = min(args.warmup, max(args.concurrency))
            for mode, server in servers.items():
                if args.warmup:
                    warmup = workload(args.warmup, args.steps, args.intervals, 1, args.seed)
                    outcomes, _ = run_requests(server.grpc_url, warmup, warm, f"warm-up {mode}")
                    failed = [o["error"] for o in outcomes if o["error"]]
                    if failed:
                        print(f"warning: {len(failed)} warm-up requests failed on {mode}: {failed[0]}")
            single = single_latency(servers, args) if args.latency_repeats else None
            for index, concurrency in enumerate(args.concurrency):
                count = args.requests or max(2 * concurrency, 8)
                requests = workload(count, args.steps, args.intervals, 100_000 * (index + 1), args.seed + index)
                level = {"concurrency": concurrency, "requests": count, "modes": {}}
                for mode in MODES if index % 2 == 0 else MODES[::-1]:
                    server = servers[mode]
                    before = scrape(server.metrics_url) if mode == "on" else {}
                    outcomes, wall = run_requests(server.grpc_url, requests, concurrency, f"c={concurrency} {mode}")
                    result = summarize(outcomes, wall)
                    if mode == "on":
                        result["batcher"] = batcher_summary(counter_deltas(before, scrape(server.metrics_url)))
                    level["modes"][mode] = result
                    for error in result["errors"]:
                        print(f"c={concurrency} {mode}: failed: {error}")
                level["first"] = MODES[0] if index % 2 == 0 else MODES[1]
                levels.append(level)
                print(table([level]).splitlines()[-1], flush=True)
            errors = {mode: server_errors(server) for mode, server in servers.items()}
    except VoltacacheError as e:  # a deployment or a server that would not start: one line, and why
        print(f"error: {e}", file=sys.stderr)
        if getattr(e, "details", None):
            print(e.details, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the servers are stopped; nothing written")
        if levels:
            print(table(levels))
        return 130

    print("\n" + table(levels))
    if single:
        print(
            f"one request at a time, alternating ({args.latency_repeats} each): median latency off "
            f"{single['off']['median_s']:.3f} s, on {single['on']['median_s']:.3f} s, on/off {single['on_vs_off']:.3f}"
        )
    print("img/s: images / wall seconds of the level; p50/p99: request latency (s); occ: mean images per U-Net call")
    for mode, lines in errors.items():
        if lines:
            print(f"{mode} server logged {len(lines)} errors, the first: {lines[0].splitlines()[0]}")
    result = {
        "engines": str(args.engines),
        "batch_sizes": export.get("batch_sizes"),
        "denoiser_instances_off": instances,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "levels": levels,
        "single_request_latency": single,
        "server_errors": errors,
    }
    print(f"-> {write_json(args.out, result)}")
    path = figure(levels, args.figure, args.label)
    if path:
        print(f"-> {path}")
    return 0


def single_latency(servers: dict, args) -> dict:
    """Latency at concurrency 1, measured the fair way: the same request (first of the mix's step
    counts, N = 1) alternating between the two servers, a fresh seed each time; medians."""
    from voltacache.benchmark import alternate, summarize
    from voltacache.serving.client import Client

    seeds = itertools.count(900_000)
    clients = {mode: Client(server.grpc_url) for mode, server in servers.items()}
    request = dict(steps=args.steps[0], scheduler="ddim", cache_mode="off")
    contenders = {mode: lambda c=c: c.generate(PROMPTS[0], seed=next(seeds), **request) for mode, c in clients.items()}
    seconds = alternate(contenders, repeats=args.latency_repeats)
    summary = summarize(seconds, "off")
    return {**summary, "on_vs_off": summary["on"]["median_s"] / summary["off"]["median_s"]}


if __name__ == "__main__":
    sys.exit(main())
