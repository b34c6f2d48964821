"""`voltacache bench`: voltacache against diffusers and DeepCache, side by side in one run.

Contenders, all on the same prompt, seed, size, steps, guidance and DDIM:
- diffusers' StableDiffusionPipeline in PyTorch (the peer a user would pick);
- diffusers with DeepCache's DeepCacheSDHelper at N = 2, 3, 5 (the anchor), on each branch;
- voltacache in process (ONNX Runtime engines) at N = 1, 2, 3, 5, on each DeepCache branch;
- voltacache through Triton (gRPC, the served ensemble) at the same settings.
Each round runs every contender once, in turn; medians over rounds are compared.

`isolate`: a model whose weights fit in memory once but not three times (SDXL: 14 GB in PyTorch, 10 GB
more per engine copy, on a 24 GiB machine) runs each group (diffusers and DeepCache; voltacache in
process; Triton) in a child process of its own, one group after the other: contenders are side by side
within a group, and the groups follow each other in one run.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .benchmark import free_port, machine, write_json
from .compile.options import Calibration
from .errors import VoltacacheError

PROMPT = "a photo of an astronaut riding a horse, highly detailed"
# Speed does not depend on what int8 was calibrated on: a short calibration keeps the SD 1.5 export
# within minutes (quality is measured on the shapes model, scripts/eval_shapes_quality.py).
BENCH_CALIBRATION = {"int8": Calibration(prompts=(PROMPT, "a red circle on a blue background"), steps=4)}


@dataclass
class BenchConfig:
    model: Path
    workdir: Path
    size: int = 256
    steps: int = 20
    guidance: float = 7.5
    repeats: int = 3
    intervals: tuple = (1, 2, 3, 5)
    deepcache_intervals: tuple = (2, 3, 5)
    branches: tuple = ("block", "0")
    triton_branches: tuple = ("block",)
    out: Path = Path("docs/results/bench.json")
    figures: Path = Path("docs/figures")
    seed: int = 0
    name: str = "bench"
    precisions: tuple = ("fp32",)  # voltacache's engines: fp32, and int8 U-Nets (contenders "voltacache-int8")
    isolate: bool = False  # each group of contenders in a process of its own, one after the other


def engines_for(
    model: Path,
    workdir: Path,
    size: int,
    branch: str,
    precision: str = "fp32",
    calibration: Calibration | None = None,
    backend: str = "onnxruntime",
) -> Path:
    """Engines for one DeepCache branch, precision (fp32, bf16, or int8 U-Nets calibrated on `calibration`,
    default Calibration()) and backend, exported once per workdir, model and calibration, built once per
    backend from that export."""
    from .compile.build import build_engines
    from .compile.export import export_model, model_fingerprint
    from .compile.options import ExportOptions
    from .runtime.manifests import read_engine_manifest, read_manifest

    options = ExportOptions(
        precision=precision, height=size, width=size, deepcache_branch=branch, calibration=calibration
    )
    options.check()
    fingerprint = options.fingerprint(model_fingerprint(model))
    suffix = "" if precision == "fp32" else f"_{precision}"
    suffix += f"_{options.calibration.id}" if options.calibration else ""
    engines = workdir / f"engines_{branch}_{size}{suffix}{'' if backend == 'onnxruntime' else '_' + backend}"
    if (engines / "engines.json").is_file() and read_engine_manifest(engines).export.fingerprint == fingerprint:
        return engines
    onnx_dir = workdir / f"onnx_{branch}_{size}{suffix}"
    if not (onnx_dir / "manifest.json").is_file() or read_manifest(onnx_dir).fingerprint != fingerprint:
        export_model(model, onnx_dir, options, force=True)
    build_engines(onnx_dir, engines, backend=backend, force=True)
    return engines


def deepcache_branch_id(unet, branch: str) -> int:
    """DeepCache's cache_branch_id for our split: branch 0 is 0; the block split keeps every layer of
    up_blocks[-1] in the shallow path, which is DeepCache's branch layers_per_block."""
    return 0 if branch == "0" else unet.config.layers_per_block


class RssSampler:
    """Peak resident memory of this process and its children (Triton) while a contender runs."""

    def __init__(self):
        import psutil

        self.process, self.peak, self.running = psutil.Process(), 0, False

    def rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a child that just exited
                pass
        return total

    def __enter__(self):
        self.peak, self.running = self.rss(), True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


@dataclass
class Contender:
    name: str
    kind: str  # diffusers | deepcache | voltacache | triton
    interval: int
    branch: str | None
    run: object  # callable(seed) -> stats dict
    seconds: list = field(default_factory=list)
    peak_rss: int = 0
    stats: dict = field(default_factory=dict)


# Contenders that share what they load (a PyTorch pipeline, engines, a server): the groups of `isolate`.
GROUPS = ("diffusers", "voltacache", "triton")  # diffusers holds DeepCache's helper; voltacache its int8 engines too


def build_contenders(cfg: BenchConfig, stack, groups=GROUPS) -> list[Contender]:
    contenders = []
    if "diffusers" in groups:
        contenders += diffusers_contenders(cfg)
    if "voltacache" in groups:
        contenders += voltacache_contenders(cfg)
    if "triton" in groups:
        contenders += triton_contenders(cfg, stack)
    return contenders


def diffusers_contenders(cfg: BenchConfig) -> list[Contender]:
    import torch
    from DeepCache import DeepCacheSDHelper

    from .compile.checkpoint import load_pipeline
    from .schedulers import make_scheduler

    pipe = load_pipeline(cfg.model)
    pipe.scheduler = make_scheduler("ddim", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)

    def diffusers_run(seed, helper=None):
        if helper:
            helper.enable()
        try:
            pipe(
                PROMPT,
                height=cfg.size,
                width=cfg.size,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np",
            )
        finally:
            if helper:
                helper.disable()
        return {}

    contenders = [Contender("diffusers", "diffusers", 1, None, diffusers_run)]
    for branch in cfg.branches:
        for n in cfg.deepcache_intervals:
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=n, cache_branch_id=deepcache_branch_id(pipe.unet, branch))
            contenders.append(
                Contender(
                    f"deepcache N={n} branch={branch}",
                    "deepcache",
                    n,
                    branch,
                    lambda seed, h=helper: diffusers_run(seed, h),
                )
            )
    return contenders


def voltacache_contenders(cfg: BenchConfig) -> list[Contender]:
    from .pipeline.stable_diffusion import StableDiffusion

    request = dict(steps=cfg.steps, guidance=cfg.guidance, scheduler="ddim")
    contenders = []
    for branch in cfg.branches:
        for precision in cfg.precisions:
            kind = "voltacache" if precision == "fp32" else f"voltacache-{precision}"
            calibration = BENCH_CALIBRATION.get(precision)
            engines = engines_for(cfg.model, cfg.workdir, cfg.size, branch, precision, calibration)
            local = StableDiffusion.from_engines(engines)

            def local_run(seed, n, local=local):
                result = local(PROMPT, seed=seed, cache_interval=n, **request)
                return {
                    "unet_deep_calls": result.stats.unet_deep_calls,
                    "unet_shallow_calls": result.stats.unet_shallow_calls,
                    "component_seconds": dict(result.stats.seconds),
                }

            for n in cfg.intervals:
                if n == 1 and branch != cfg.branches[0]:
                    continue  # N = 1 never runs the shallow model: the same work on every branch
                contenders.append(
                    Contender(
                        f"{kind} N={n} branch={branch}", kind, n, branch, lambda seed, n=n, f=local_run: f(seed, n)
                    )
                )
    return contenders


def triton_contenders(cfg: BenchConfig, stack) -> list[Contender]:
    from .serving.client import Client
    from .serving.deploy import deploy
    from .serving.server import TritonServer

    request = dict(steps=cfg.steps, guidance=cfg.guidance, scheduler="ddim")
    contenders = []
    for branch in cfg.branches:
        engines = engines_for(cfg.model, cfg.workdir, cfg.size, branch)
        if branch in cfg.triton_branches:
            repo = deploy(engines, cfg.workdir / f"repo_{branch}_{cfg.size}")
            ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
            server = stack.enter_context(TritonServer(repo, **ports))
            client = Client(server.grpc_url)

            def served(seed, n, client=client):
                out = client.generate(PROMPT, seed=seed, cache_interval=n, **request)
                return {"unet_deep_calls": out.unet_deep_calls, "unet_shallow_calls": out.unet_shallow_calls}

            for n in cfg.intervals:
                contenders.append(
                    Contender(
                        f"triton N={n} branch={branch}", "triton", n, branch, lambda seed, n=n, f=served: f(seed, n)
                    )
                )
    return contenders


def run(cfg: BenchConfig, progress=None) -> dict:
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    if cfg.isolate:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        contenders, batch_sizes = [], {}
        for group in GROUPS:  # one process each, one after the other: only one group's weights in memory
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as child:
                timed, sizes = child.submit(run_group, cfg, (group,)).result()
            contenders += timed
            batch_sizes.update(sizes)
            if progress:
                progress(group)
    else:
        contenders, batch_sizes = run_group(cfg, GROUPS, progress)
    result = report(cfg, contenders)
    result["batch_sizes"] = batch_sizes
    result["step_batching_plan"] = {
        engines: {n: step_batching_plan(times, n, cfg.steps) for n in cfg.intervals}
        for engines, times in result["batch_sizes"].items()
    }
    return result


def run_group(cfg: BenchConfig, groups: tuple, progress=None) -> tuple[list[Contender], dict]:
    """Time the contenders of `groups` side by side: a warm-up round, then `cfg.repeats` rounds. Returns them
    (without their callables, so that a child process can return them) and, with voltacache's group, the
    U-Net seconds per call at each engine size."""
    from contextlib import ExitStack

    seeds = itertools.count(cfg.seed)  # a fresh seed per call keeps Triton's response cache out of it
    with ExitStack() as stack:
        contenders = build_contenders(cfg, stack, groups)
        for contender in contenders:  # warm-up round, untimed
            contender.run(next(seeds))
        for _ in range(cfg.repeats):
            for contender in contenders:
                with RssSampler() as rss:
                    started = time.perf_counter()
                    contender.stats = contender.run(next(seeds)) or {}
                    contender.seconds.append(time.perf_counter() - started)
                contender.peak_rss = max(contender.peak_rss, rss.peak)
                if progress:
                    progress(contender.name)
    for contender in contenders:
        contender.run = None
    batch_sizes = {}
    if "voltacache" in groups:
        for branch in cfg.branches:
            for precision in cfg.precisions:
                calibration = BENCH_CALIBRATION.get(precision)
                engines = engines_for(cfg.model, cfg.workdir, cfg.size, branch, precision, calibration)
                batch_sizes[f"{branch} {precision}"] = batch_size_times(engines, cfg.repeats)
    return contenders, batch_sizes


def step_batching_plan(times: dict, interval: int, steps: int) -> dict:
    """U-Net images per second a step-batching server would reach with `occupancy` requests in flight,
    from measured per-size call times. The requests are evenly staggered: in tick j, those whose step
    is a refresh step (one in N) share one unet_deep call and the rest one unet_shallow call, and
    every request advances one of its `steps`; tick times are averaged over the N phases. A call
    runs at the smallest built size that holds it (what a TensorRT engine pads to; ONNX Runtime runs
    exactly n, so for it this is an upper bound on time)."""

    def call(name, images):
        if images == 0:
            return 0.0
        built = sorted(int(n) for n in times[name])
        size = next((n for n in built if n >= images), built[-1])
        return times[name][size] * math.ceil(images / size) if size < images else times[name][size]

    plan = {}
    for occupancy in sorted(int(n) for n in times["unet_deep"]):
        ticks = []
        for phase in range(interval):
            deep = sum(1 for i in range(occupancy) if (i + phase) % interval == 0)
            ticks.append(call("unet_deep", deep) + call("unet_shallow", occupancy - deep))
        plan[occupancy] = occupancy / (float(np.mean(ticks)) * steps)
    return plan


def batch_size_times(engines: Path, repeats: int) -> dict:
    """Seconds per U-Net call at each batch size the engines were built for (what step batching packs
    requests into): {component: {images: median seconds}}. On a GPU these are the TensorRT profiles'
    times, the input of the throughput plan in docs/benchmarks.md."""
    from .runtime.engines import load_engines
    from .specs import UNET_DEEP, UNET_SHALLOW

    loaded = load_engines(engines, components=(UNET_DEEP, UNET_SHALLOW))
    times = {}
    for name, runner in loaded.runners.items():
        times[name] = {}
        for images in loaded.export.batch_sizes:
            feeds = {t.name: t.zeros() for t in runner.spec.for_images(images).inputs}
            runner.infer(feeds)  # warm-up: first-call allocations and kernel choices
            seconds = []
            for _ in range(max(repeats, 3)):
                started = time.perf_counter()
                runner.infer(feeds)
                seconds.append(time.perf_counter() - started)
            times[name][images] = float(np.median(seconds))
    return times


def report(cfg: BenchConfig, contenders: list[Contender]) -> dict:
    median = {c.name: float(np.median(c.seconds)) for c in contenders}
    base = median["diffusers"]
    rows = []
    for c in contenders:
        anchor = f"deepcache N={c.interval} branch={c.branch}"
        own_n1 = f"{c.kind} N=1 branch={cfg.branches[0]}"
        fp32 = c.name.replace("voltacache-int8", "voltacache", 1)
        rows.append(
            {
                "name": c.name,
                "kind": c.kind,
                "interval": c.interval,
                "branch": c.branch,
                "median_s": median[c.name],
                "runs_s": c.seconds,
                "speedup_vs_diffusers": base / median[c.name],
                "speedup_vs_deepcache_same_n": median[anchor] / median[c.name] if anchor in median else None,
                "speedup_vs_own_n1": median[own_n1] / median[c.name] if own_n1 in median else None,
                "speedup_vs_fp32": median[fp32] / median[c.name] if fp32 in median and fp32 != c.name else None,
                **per_call(c.stats),
                "peak_rss_gb": c.peak_rss / 1e9,
                **c.stats,
            }
        )
    triton_overhead = {
        r["name"]: median[r["name"]] / median[r["name"].replace("triton", "voltacache", 1)] - 1
        for r in rows
        if r["kind"] == "triton" and r["name"].replace("triton", "voltacache", 1) in median
    }
    cfg_json = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    return {"config": cfg_json, "machine": machine(), "rows": rows, "triton_overhead": triton_overhead}


def per_call(stats: dict) -> dict:
    """Seconds per deep and per shallow U-Net call, from a run's component times and call counts."""
    seconds = stats.get("component_seconds", {})
    return {
        f"{unet}_s_per_call": seconds[unet] / stats[f"{unet}_calls"]
        for unet in ("unet_deep", "unet_shallow")
        if stats.get(f"{unet}_calls") and unet in seconds
    }


def plot(result: dict, figures: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, branch in sorted({(r["kind"], r["branch"]) for r in rows if r["kind"] != "diffusers"}, key=str):
        # N = 1 is the same work on every branch: voltacache runs it once, DeepCache N = 1 is diffusers
        points = sorted(
            (r["interval"], r["speedup_vs_diffusers"])
            for r in rows
            if r["kind"] == kind and (r["branch"] == branch or r["interval"] == 1 and kind.startswith("voltacache"))
        )
        points = [(1, 1.0), *points] if kind == "deepcache" else points
        ax.plot(*zip(*points), marker="o", label=f"{kind} (branch {branch})")
    ax.axhline(1.0, color="gray", linestyle=":", label="diffusers")
    ax.set_xlabel("DeepCache interval N (full U-Net every N steps)")
    ax.set_ylabel("speedup over diffusers (median s/image)")
    ax.set_title(f"{name}: speedup against N")
    ax.legend(fontsize=8)
    speedup = figures / f"{name}_speedup.png"
    fig.tight_layout()
    fig.savefig(speedup, dpi=120)
    plt.close(fig)

    timed = [r for r in rows if r.get("component_seconds")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bottom = np.zeros(len(timed))
    for component in ("text_encoder", "unet_deep", "unet_shallow", "vae_decoder"):
        values = np.array([r["component_seconds"].get(component, 0.0) for r in timed])
        ax.bar([r["name"].replace("voltacache ", "") for r in timed], values, bottom=bottom, label=component)
        bottom += values
    ax.set_ylabel("seconds per image (last timed run)")
    ax.set_title(f"{name}: time per component, voltacache in process")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    ax.legend(fontsize=8)
    components = figures / f"{name}_components.png"
    fig.tight_layout()
    fig.savefig(components, dpi=120)
    plt.close(fig)
    return [speedup, components]


def main(cfg: BenchConfig, console=None) -> dict:
    from rich.progress import Progress

    if not Path(cfg.model).exists():
        raise VoltacacheError(f"{cfg.model}: no such model; `voltacache init-tiny DIR --preset sd15` writes one")
    with Progress(console=console) as bars:
        task = bars.add_task(cfg.name, total=None)
        result = run(cfg, progress=lambda name: bars.update(task, description=name, advance=1))
    write_json(cfg.out, result)
    result["figures"] = [str(p) for p in plot(result, cfg.figures, cfg.name)]
    write_json(cfg.out, result)
    return result


def table(result: dict) -> str:
    lines = [
        f"{'contender':<37} {'s/image':>9} {'vs diffusers':>12} {'vs DeepCache':>12} {'vs own N=1':>10} "
        f"{'vs fp32':>8} {'deep s/call':>11} {'shallow s/call':>14}"
    ]
    for r in result["rows"]:
        fmt = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
        sec = lambda v: f"{v:.3f}" if v else "-"  # noqa: E731
        lines.append(
            f"{r['name']:<37} {r['median_s']:>9.3f} {fmt(r['speedup_vs_diffusers']):>12} "
            f"{fmt(r['speedup_vs_deepcache_same_n']):>12} {fmt(r['speedup_vs_own_n1']):>10} "
            f"{fmt(r.get('speedup_vs_fp32')):>8} {sec(r.get('unet_deep_s_per_call')):>11} "
            f"{sec(r.get('unet_shallow_s_per_call')):>14}"
        )
    for name, overhead in result["triton_overhead"].items():
        lines.append(f"Triton overhead {name}: {overhead * 100:+.1f}%")
    for engines, components in result.get("batch_sizes", {}).items():
        for component, times in components.items():
            per_image = ", ".join(f"{n}: {s / n:.3f}" for n, s in times.items())
            lines.append(f"{component} ({engines}) s per image by batch size: {per_image}")
    for engines, by_interval in result.get("step_batching_plan", {}).items():
        for n, plan in by_interval.items():
            rates = ", ".join(f"{b} in flight: {r:.2f}" for b, r in plan.items())
            lines.append(f"step batching plan ({engines}, N={n}), U-Net images/s: {rates}")
    return "\n".join(lines)
