"""The `voltacache` command line: one subcommand per stage of checkpoint -> engines -> Triton."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from .cache.layers import DEFAULT_BANDS, NIRVANA_BANDS, CacheConfig, CacheSettings
from .errors import NotBuiltYet, VoltacacheError

app = typer.Typer(
    help="Compile Stable Diffusion to ONNX / TensorRT engines and serve it from Triton with caching.",
    no_args_is_help=True,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect and manage the cross-request cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
err = Console(stderr=True)


def user_errors(fn):
    """Print a VoltacacheError as one line (no traceback); exit 2 for what is not built yet."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NotBuiltYet as e:
            err.print(f"[yellow]not built yet:[/] {escape(str(e))}")
            raise typer.Exit(2) from None
        except VoltacacheError as e:
            err.print(f"[red]error:[/] {escape(str(e))}")
            raise typer.Exit(1) from None

    return wrapper


def not_built(what: str, issue: str):
    raise NotBuiltYet(f"`voltacache {what}` arrives with the {issue} issue")


CACHE_THRESHOLD = typer.Option(
    CacheConfig.semantic_threshold, help="Cache: the similarity from which a stored image is served."
)
CACHE_BANDS = typer.Option(
    DEFAULT_BANDS,
    help="Cache: SIMILARITY:FRACTION,... a match this similar starts FRACTION of the steps in from its latent "
    f"(NIRVANA's own: {NIRVANA_BANDS}).",
)


@app.command("init-tiny")
@user_errors
def init_tiny(
    out: Path = typer.Argument(..., help="Folder to write the diffusers-format pipeline into."),
    seed: int = typer.Option(0, help="Seed of the random weights (tiny, sd15)."),
    preset: str = typer.Option(
        "tiny",
        help="tiny (random weights, seconds per image on a CPU), shapes (tiny, trained on captioned shapes: "
        "images that follow the prompt) or sd15 (full SD 1.5, random weights, ~4 GB).",
    ),
    single_file: Path | None = typer.Option(
        None, help="Also write the pipeline as one SD 1.x (LDM layout) .safetensors checkpoint here."
    ),
):
    """Write a Stable Diffusion pipeline with SD 1.5's topology: random weights, or the trained shapes model."""
    from .presets import PRESETS, write_pipeline

    if preset not in PRESETS:
        raise VoltacacheError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    write_pipeline(out, preset, seed)
    if single_file:
        from .checkpoint import load_pipeline
        from .single_file import save_single_file

        save_single_file(load_pipeline(out), single_file)
        err.print(f"single file: {single_file}")
    print(out)


@app.command()
@user_errors
def export(
    model: Path = typer.Option(..., help="diffusers folder or single SD 1.x .safetensors checkpoint."),
    out: Path = typer.Option(..., help="Folder for the ONNX files and manifest.json."),
    precision: str = typer.Option("fp16", help="fp16 (weights and compute) or fp32 (what a CPU serves)."),
    batch: int = typer.Option(1, help="Images per call (the U-Net sees 2x: classifier-free guidance)."),
    height: int | None = typer.Option(None, help="Image height in pixels (default: the model's native size)."),
    width: int | None = typer.Option(None, help="Image width in pixels (default: the model's native size)."),
    opset: int = typer.Option(23, help="23: fused ONNX Attention (TensorRT >= 10.14); 18: unfused, TensorRT fuses it."),
    deepcache_branch: str = typer.Option(
        "block", help="block (deep feature = input of up_blocks[-1]) or 0 (shallowest)."
    ),
    config: Path | None = typer.Option(
        None, help="diffusers config folder for a single-file checkpoint (default SD 1.5)."
    ),
    allow_pickle: bool = typer.Option(False, help="Load .ckpt/.bin/.pt checkpoints (pickle can run arbitrary code)."),
):
    """Export CLIP, the U-Net split at the DeepCache point, and the VAE to ONNX, validated and linted."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .export import STAGES, ExportOptions, export_model
    from .specs import COMPONENTS

    options = ExportOptions(precision, batch, height, width, opset, deepcache_branch)
    columns = (
        TextColumn("{task.description:<13}"),
        BarColumn(),
        TextColumn("{task.fields[stage]:<9}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err) as bars:
        tasks = {c: bars.add_task(c, total=len(STAGES), stage="waiting", start=False) for c in COMPONENTS}

        def progress(component, stage):
            task = tasks[component]
            bars.start_task(task)
            for other in COMPONENTS[: COMPONENTS.index(component)]:
                bars.update(tasks[other], completed=len(STAGES), stage="done")
            bars.update(task, completed=STAGES.index(stage), stage=stage)

        manifest = export_model(model, out, options, allow_pickle=allow_pickle, config=config, progress=progress)
        for task in tasks.values():
            bars.update(task, completed=len(STAGES), stage="done")
    print_export_report(manifest)
    print(out)


def print_export_report(manifest: dict):
    from rich.table import Table

    table = Table(title=f"{manifest['precision']} opset {manifest['opset']}, branch {manifest['deepcache_branch']}")
    for column in ("component", "max error", "tolerance", "Attention nodes", "TensorRT lint"):
        table.add_column(column)
    for name, entry in manifest["components"].items():
        lint = entry["tensorrt_lint"]
        verdict = f"ok ({lint['target']})" if lint["ok"] else "; ".join(lint["problems"])
        table.add_row(
            name, f"{entry['max_error']:.2e}", f"{entry['tolerance']:.0e}", str(entry["attention_nodes"]), verdict
        )
    err.print(table)


@app.command()
@user_errors
def build(
    onnx: Path = typer.Option(..., help="Folder written by `voltacache export`."),
    out: Path = typer.Option(..., help="Folder for the engines and engines.json."),
    backend: str = typer.Option("auto", help="auto (TensorRT where it can run), tensorrt or onnxruntime."),
    optimization_level: int = typer.Option(3, help="TensorRT builder optimization level (0-5)."),
):
    """Build static TensorRT engines (GPU) or optimized ONNX Runtime models (CPU)."""
    from rich.progress import Progress

    from .build import build_engines, choose_backend
    from .specs import COMPONENTS

    chosen, reason = choose_backend(backend)
    err.print(f"backend: {chosen} ({escape(reason)})")
    with Progress(console=err) as bars:
        task = bars.add_task("build", total=len(COMPONENTS))

        def progress(component):
            bars.update(task, description=component, completed=COMPONENTS.index(component))

        manifest = build_engines(onnx, out, chosen, optimization_level, progress=progress)
        bars.update(task, description="done", completed=len(COMPONENTS))
    if manifest["export"]["precision"] == "fp16" and chosen == "onnxruntime":
        err.print(
            "[yellow]note:[/] fp16 runs slower than fp32 on ONNX Runtime's CPU provider; export fp32 to serve on CPU"
        )
    print(out)


@app.command()
@user_errors
def deploy(
    engines: Path = typer.Option(..., help="Folder written by `voltacache build`."),
    repo: Path = typer.Option(..., help="Model repository to write (replaced if it exists)."),
    component_backend: str = typer.Option(
        "python", help="python (ONNX Runtime in a Python model: the CPU server), onnxruntime (NGC) or tensorrt."
    ),
    denoiser_instances: int = typer.Option(2, help="Denoiser instances: requests denoised in parallel."),
    cache: str = typer.Option("off", help="Cross-request cache index: off, a milvus-lite file, or a Milvus URL."),
    cache_embedder: str = typer.Option("clip", help="clip (the pipeline's pooled output) or minilm."),
    blob_store: str | None = typer.Option(None, help="Blob folder or s3://bucket/prefix (needed with a Milvus URL)."),
    cache_ttl: float = typer.Option(CacheSettings.ttl_s, help="Seconds an entry may be served."),
    cache_policy: str = typer.Option(CacheSettings.policy, help="Eviction: lcbfu, fifo, lifo, lru, lfu or random."),
    cache_max_entries: int | None = typer.Option(None, help="Capacity in entries."),
    cache_max_bytes: int | None = typer.Option(None, help="Capacity in bytes."),
    cache_threshold: float = CACHE_THRESHOLD,
    cache_bands: str = CACHE_BANDS,
):
    """Write a Triton model repository with the txt2img / img2img ensembles."""
    from .serving.deploy import deploy as write_repository

    settings = CacheSettings(
        None if cache == "off" else cache,
        cache_embedder,
        blob_store,
        cache_ttl,
        cache_policy,
        cache_max_entries,
        cache_max_bytes,
        cache_threshold,
        cache_bands,
    )
    print(write_repository(engines, repo, component_backend, denoiser_instances, settings))


@app.command()
@user_errors
def serve(
    repo: Path = typer.Option(..., help="Triton model repository written by `voltacache deploy`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes the server to the network)."),
    http_port: int = typer.Option(8000),
    grpc_port: int = typer.Option(8001),
    metrics_port: int = typer.Option(8002),
    cache_mb: int = typer.Option(256, help="Triton response cache size in MiB (exact duplicate requests)."),
    log_file: Path | None = typer.Option(None, help="Write tritonserver's log here."),
):
    """Start tritonserver on a model repository; stops cleanly on Ctrl-C or SIGTERM."""
    import signal
    import threading

    from .serving.server import TritonServer

    server = TritonServer(repo, host, http_port, grpc_port, metrics_port, cache_mb * 1024 * 1024, log_file)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        err.print(f"tritonserver ready: http {server.http_url}  grpc {server.grpc_url}  metrics {server.metrics_url}")
        while not stop.is_set() and server.process.poll() is None:
            stop.wait(0.5)
    err.print("tritonserver stopped")


@app.command()
@user_errors
def generate(
    prompt: str | None = typer.Argument(None, help="Text prompt."),
    output: Path = typer.Option(Path("out.png"), "-o", "--output", help="Image file (several get _1, _2, ...)."),
    engines: Path | None = typer.Option(None, help="Engines folder: generate in process."),
    url: str | None = typer.Option(None, help="HOST:PORT of a voltacache Triton server: generate there."),
    protocol: str = typer.Option("grpc", help="grpc or http (with --url)."),
    prompts: Path | None = typer.Option(None, help="A file of prompts, one per line (with --url)."),
    concurrency: int = typer.Option(1, help="Requests in flight at once (with --prompts)."),
    negative_prompt: str = typer.Option("", help="What the image should not show."),
    steps: int = typer.Option(50, help="Denoising steps."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    seed: int | None = typer.Option(None, help="Seed of the initial latents (default: random, reported)."),
    scheduler: str = typer.Option("pndm", help="ddim, pndm, euler, euler-a, dpm++2m or lms."),
    cache_interval: int = typer.Option(1, help="DeepCache: the full U-Net every N steps (1: off)."),
    cache_schedule: str = typer.Option("uniform", help="DeepCache schedule: uniform or nonuniform (in process)."),
    height: int | None = typer.Option(None, help="Must equal the engines' static height."),
    width: int | None = typer.Option(None, help="Must equal the engines' static width."),
    init_image: Path | None = typer.Option(None, help="img2img: start from this image."),
    strength: float = typer.Option(0.8, help="img2img: how much of the schedule to run (0-1]."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object per image."),
    cache: str = typer.Option("on", help="Cross-request cache for this request: on, off or refresh."),
    cache_index: str | None = typer.Option(
        None, help="In process: the cache index (milvus-lite file or Milvus URL); none: no cache."
    ),
    cache_embedder: str = typer.Option("clip", help="In process: clip (the pipeline's pooled output) or minilm."),
    blob_store: str | None = typer.Option(None, help="In process: blob folder or s3://bucket/prefix."),
    cache_threshold: float = CACHE_THRESHOLD,
    cache_bands: str = CACHE_BANDS,
):
    """Generate images in process (--engines) or through Triton (--url)."""
    from .generate import GenerateOptions, generate_in_process, generate_served

    if (engines is None) == (url is None):
        raise VoltacacheError("give exactly one of --engines DIR (in process) or --url HOST:PORT (Triton)")
    texts = read_prompts(prompts) if prompts else ([prompt] if prompt else [])
    if not texts:
        raise VoltacacheError("give a prompt, or --prompts FILE")
    options = GenerateOptions(
        negative_prompt,
        steps,
        guidance,
        seed,
        scheduler,
        cache_interval,
        cache_schedule,
        height,
        width,
        init_image,
        strength,
    )
    if engines is not None:
        if cache not in ("on", "off", "refresh"):
            raise VoltacacheError(f"--cache {cache!r}: use on, off or refresh")
        records = generate_in_process(
            engines,
            texts,
            options,
            output,
            CacheSettings(
                cache_index, cache_embedder, blob_store, semantic_threshold=cache_threshold, bands=cache_bands
            ),
            cache,
        )
    else:
        records = generate_served(url, protocol, texts, options, output, concurrency, err, cache)
    for record in records:
        print(json.dumps(record) if json_output else record["path"])


@app.command("check-shapes")
@user_errors
def check_shapes(
    image: Path = typer.Argument(..., help="An image of the shapes preset."),
    caption: str = typer.Argument(..., help='Its prompt: "a {color} {shape} on a {background} background".'),
):
    """Read the shape, its color and the background off an image and compare them with the caption."""
    from dataclasses import asdict

    from PIL import Image

    from .shapes.checker import compare, read_image

    if not image.is_file():
        raise VoltacacheError(f"{image}: no such image")
    reading = read_image(Image.open(image))
    try:
        verdict = compare(reading, caption) | {"read": asdict(reading)}
    except ValueError as e:
        raise VoltacacheError(str(e)) from None
    print(json.dumps(verdict))
    if not verdict["all_ok"]:
        raise typer.Exit(1)


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise VoltacacheError(f"{path}: no such prompts file")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@app.command()
@user_errors
def bench(
    model: Path = typer.Option(..., help="Checkpoint to benchmark (e.g. `voltacache init-tiny DIR --preset sd15`)."),
    workdir: Path = typer.Option(Path("build/bench"), help="Where exports, engines and repositories are cached."),
    size: int = typer.Option(256, help="Image side in pixels."),
    steps: int = typer.Option(20, help="DDIM steps."),
    repeats: int = typer.Option(3, help="Timed rounds (after one warm-up round); medians are reported."),
    intervals: str = typer.Option("1,2,3,5", help="voltacache DeepCache intervals."),
    deepcache_intervals: str = typer.Option("2,3,5", help="DeepCache helper intervals."),
    branches: str = typer.Option("block,0", help="DeepCache branches to compare."),
    triton_branches: str = typer.Option("block", help="Branches also served through Triton ('' for none)."),
    name: str = typer.Option("bench", help="Name of the JSON and the figures."),
    out: Path | None = typer.Option(None, help="JSON results (default docs/results/NAME.json)."),
    figures: Path = typer.Option(Path("docs/figures"), help="Folder for the PNG plots."),
):
    """Benchmark against diffusers and DeepCache, side by side: seconds per image, speedups, plots."""
    from .bench import BenchConfig, main, table

    def ints(text):
        return tuple(int(x) for x in text.split(",") if x)

    def names(text):
        return tuple(x for x in text.split(",") if x)

    cfg = BenchConfig(
        model,
        workdir,
        size,
        steps,
        7.5,
        repeats,
        ints(intervals),
        ints(deepcache_intervals),
        names(branches),
        names(triton_branches),
        out or Path(f"docs/results/{name}.json"),
        figures,
        name=name,
    )
    result = main(cfg, console=err)
    print(table(result))
    print(f"results: {cfg.out}; figures: {', '.join(result['figures'])}")


def _open_store(index: str, blob_store: str | None, embedder: str, dim: int):
    from .cache.layers import open_request_cache

    return open_request_cache(index, blob_store, embedder, "", dim).store


CACHE_INDEX = typer.Option(..., "--cache-index", help="The cache index: milvus-lite file or Milvus server URL.")
CACHE_EMBEDDER = typer.Option("clip", help="Which embedder's entries: clip or minilm.")
CACHE_DIM = typer.Option(768, help="CLIP embedding width of the model (768 for SD 1.5, 64 for the tiny preset).")
BLOB_STORE = typer.Option(None, help="Blob folder or s3://bucket/prefix (default: beside a file index).")


@cache_app.command("stats")
@user_errors
def cache_stats(
    index: str = CACHE_INDEX,
    embedder: str = CACHE_EMBEDDER,
    dim: int = CACHE_DIM,
    blob_store: str | None = BLOB_STORE,
):
    """Entries, bytes, hits and evictions of the cache."""
    print(json.dumps(_open_store(index, blob_store, embedder, dim).stats(), indent=2))


@cache_app.command("clear")
@user_errors
def cache_clear(
    index: str = CACHE_INDEX,
    embedder: str = CACHE_EMBEDDER,
    dim: int = CACHE_DIM,
    blob_store: str | None = BLOB_STORE,
):
    """Remove every entry and blob."""
    _open_store(index, blob_store, embedder, dim).clear()
    err.print("cache cleared")


@cache_app.command("purge-expired")
@user_errors
def cache_purge(
    index: str = CACHE_INDEX,
    embedder: str = CACHE_EMBEDDER,
    dim: int = CACHE_DIM,
    blob_store: str | None = BLOB_STORE,
):
    """Remove entries past their TTL and blobs no entry points at."""
    print(json.dumps({"purged": _open_store(index, blob_store, embedder, dim).purge_expired()}))


@cache_app.command("warm")
@user_errors
def cache_warm(
    prompts: Path = typer.Option(..., help="A file of prompts, one per line."),
    engines: Path = typer.Option(..., help="Engines folder (the cache is scoped to their model)."),
    index: str = CACHE_INDEX,
    embedder: str = CACHE_EMBEDDER,
    blob_store: str | None = BLOB_STORE,
    steps: int = typer.Option(50),
    guidance: float = typer.Option(7.5),
    scheduler: str = typer.Option("pndm"),
    out: Path = typer.Option(Path("build/warm/img.png"), help="Where the generated images go."),
):
    """Generate and store the prompts of a file (refresh mode: each is computed and stored)."""
    from .generate import GenerateOptions, generate_in_process

    options = GenerateOptions(steps=steps, guidance=guidance, scheduler=scheduler)
    records = generate_in_process(
        engines, read_prompts(prompts), options, out, CacheSettings(index, embedder, blob_store), "refresh"
    )
    err.print(f"warmed {len(records)} entries")


def main():
    sys.exit(app())
