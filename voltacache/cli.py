"""The `voltacache` command line: one subcommand per stage of checkpoint -> engines -> Triton."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from .cache.layers import DEFAULT_BANDS, NIRVANA_BANDS, CacheConfig, CacheSettings
from .cache.search import DEFAULT_TOP, MAX_TOP
from .cache.store import LISTING_ORDERS
from .errors import BadConfiguration, UsageError, VoltacacheError
from .outputs import SEARCH_RESULTS, check_file, check_folder, staged_output
from .pipeline.calibrate import DEFAULT_INTERVALS, DEFAULT_PROMPTS, DEFAULT_STEPS
from .pipeline.calibration import SCHEDULES_FILE
from .pipeline.lora import RESIDENT_VARIANTS
from .request import DEFAULT_REFRESH_THRESHOLD, IMG2IMG_STRENGTH, INPAINT_STRENGTH, MAX_GUIDANCE, MAX_STEPS, Request
from .schedulers import SCHEDULERS

app = typer.Typer(
    help="Compile Stable Diffusion to ONNX / TensorRT engines and serve it from Triton with caching.",
    no_args_is_help=True,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect and manage the cross-request cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
err = Console(stderr=True)


DEBUG = {"on": False}  # --debug: let tracebacks through
# Known-harmless chatter of the libraries below us (diffusers' and transformers' loading bars, transformers'
# advice to install torchvision, which would replace the CPU torch): off unless --debug. Our own progress
# bars (rich) stay. Set before those libraries import, and inherited by the servers a command starts.
QUIET_THIRD_PARTIES = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
# A warning is one line too ("warning: ..."), not Python's two with the source line.
warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of a failure."),
):
    """Compile Stable Diffusion to ONNX / TensorRT engines and serve it from Triton with caching."""
    DEBUG["on"] = debug
    if not debug:
        quiet_third_parties()


def quiet_third_parties() -> None:
    import logging

    for key, value in QUIET_THIRD_PARTIES.items():
        os.environ.setdefault(key, value)
    # torch.onnx's exporter says, for each graph, that torchvision's ops are not registered (we have none)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    # and torch's own pytree deprecation, raised inside torch.export
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def fail(message: str, code: int, details: str = "") -> typer.Exit:
    """One line on stderr (then any details, such as the log lines that say why a server failed)."""
    print("error: " + " ".join(str(message).split("\n")), file=sys.stderr)
    if details:
        print(details, file=sys.stderr)
    return typer.Exit(code)


def user_errors(fn):
    """The CLI's edge: every failure is one line on stderr and an exit code (2 usage, 1 failure,
    130 interrupted); a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except VoltacacheError as e:
            if DEBUG["on"]:
                raise
            raise fail(str(e), e.exit_code, getattr(e, "details", "")) from None
        except KeyboardInterrupt:
            if DEBUG["on"]:
                raise
            raise fail("interrupted", 130) from None
        except Exception as e:  # a bug or an unforeseen failure: still one line, the traceback on request
            if DEBUG["on"]:
                raise
            raise fail(f"unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", 1) from None

    return wrapper


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
    seed: int = typer.Option(0, help="Seed of the random weights (all but shapes)."),
    preset: str = typer.Option(
        "tiny",
        help="tiny (SD 1.5's topology, random weights, seconds per image on a CPU), shapes (tiny, trained on "
        "captioned shapes: images that follow the prompt), sd2-tiny (SD 2.x: v-prediction, OpenCLIP-style "
        "encoder), sdxl-tiny (SDXL: two text encoders, size conditioning), inpaint-tiny (SD 1.5 inpainting's "
        "9-channel U-Net), or the full architectures with random "
        "weights: sd15 (~4 GB), sd2 (~5 GB), sdxl (~14 GB).",
    ),
    single_file: Path | None = typer.Option(
        None, help="Also write the pipeline as one single-file (LDM/SGM layout) .safetensors checkpoint here."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace a pipeline (and --single-file) that init-tiny wrote before; anything else is never replaced.",
    ),
):
    """Write a Stable Diffusion pipeline (SD 1.5, SD 2.x or SDXL topology): random weights, or the shapes model."""
    from .compile.presets import PRESETS, write_pipeline

    if preset not in PRESETS:
        raise UsageError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if single_file:
        from .compile.single_file import is_our_single_file

        # refused before anything is written
        check_file(
            single_file, force=force, ours=is_our_single_file, arg="--single-file", what="single-file checkpoint"
        )
    write_pipeline(out, preset, seed, force=force)
    if single_file:
        from .compile.checkpoint import load_pipeline
        from .compile.single_file import save_single_file

        save_single_file(load_pipeline(out), single_file, force=force)
        err.print(f"single file: {single_file}")
    print(out)


@app.command()
@user_errors
def export(
    model: Path = typer.Option(..., help="diffusers folder or single SD 1.x .safetensors checkpoint."),
    out: Path = typer.Option(..., help="Folder for the ONNX files and manifest.json."),
    precision: str = typer.Option(
        "fp16",
        help="fp16 (weights and compute), fp32 (what a CPU serves) or int8 (the U-Nets calibrated and quantized, "
        "QDQ: ONNX Runtime's int8 kernels on CPU, an explicitly quantized TensorRT engine on GPU).",
    ),
    calibration_prompts: Path | None = typer.Option(
        None, help="int8: a file of prompts, one per line, whose denoising trajectories calibrate the U-Nets."
    ),
    calibration_steps: int | None = typer.Option(None, help="int8: DDIM steps per calibration prompt (default 10)."),
    batch: int = typer.Option(1, help="Images per call (the U-Net sees 2x: classifier-free guidance)."),
    batch_sizes: str | None = typer.Option(
        None,
        help="Images per engine call the engines serve, comma-separated multiples of --batch, e.g. 1,2,4,8 "
        "(the default: --batch x 1,2,4,8); a server runs many requests' steps in one call.",
    ),
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
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace an export already in --out (it stays until the new one is complete); "
        "a folder voltacache did not write is never replaced.",
    ),
):
    """Export CLIP, the U-Net split at the DeepCache point, and the VAE to ONNX, validated and linted."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .compile.checkpoint import check_model_path
    from .compile.options import ExportOptions, parse_batch_sizes
    from .outputs import EXPORT, check_folder, refuse_overlap
    from .specs import COMPONENTS

    calibration = None
    if calibration_prompts is not None or calibration_steps is not None:
        from .compile.options import Calibration

        calibration = Calibration.from_file(calibration_prompts, calibration_steps or Calibration.steps)
    sizes = parse_batch_sizes(batch_sizes) if batch_sizes is not None else None
    options = ExportOptions(
        precision=precision,
        batch=batch,
        height=height,
        width=width,
        opset=opset,
        deepcache_branch=deepcache_branch,
        calibration=calibration,
        batch_sizes=sizes,
    )
    options.check()  # before torch and the exporter are imported: a mistake is refused at once
    check_model_path(model, allow_pickle)
    refuse_overlap(out, model, "--out", "--model")
    check_folder(out, EXPORT, force=force)

    from .compile.export import STAGES, export_model

    columns = (
        TextColumn("{task.description:<13}"),
        BarColumn(),
        TextColumn("{task.fields[stage]:<9}"),
        TimeElapsedColumn(),
    )
    # The bars appear when the work starts (a refused --out or a bad checkpoint is one line on stderr),
    # on a terminal only: a log gets the report below.
    bars = Progress(*columns, console=err, disable=not err.is_terminal)
    tasks = {c: bars.add_task(c, total=len(STAGES), stage="waiting", start=False) for c in COMPONENTS}

    def progress(component, stage):
        # every component is traced first, then converted, checked and linted (voltacache.compile.export.STAGES)
        bars.start()
        task = tasks[component]
        bars.start_task(task)
        bars.update(task, completed=len(STAGES) if stage == "done" else STAGES.index(stage), stage=stage)

    try:
        manifest = export_model(
            model, out, options, allow_pickle=allow_pickle, config=config, progress=progress, force=force
        )
        for task in tasks.values():
            bars.update(task, completed=len(STAGES), stage="done")
    finally:
        bars.stop()
    print_export_report(manifest)
    print(out)


def print_export_report(manifest: dict):
    from rich.table import Table

    table = Table(title=f"{manifest.precision} opset {manifest.opset}, branch {manifest.deepcache_branch}")
    for column in ("component", "max error", "tolerance", "int8 vs fp32", "Attention nodes", "TensorRT lint"):
        table.add_column(column)
    for name, entry in manifest.components.items():
        entry = entry.to_json()
        lint = entry["tensorrt_lint"]
        verdict = f"ok ({lint['target']})" if lint["ok"] else "; ".join(lint["problems"])
        int8 = f"{entry['int8_error']:.2e}" if "int8_error" in entry else "-"
        table.add_row(
            name,
            f"{entry['max_error']:.2e}",
            f"{entry['tolerance']:.0e}",
            int8,
            str(entry["attention_nodes"]),
            verdict,
        )
    err.print(table)


@app.command()
@user_errors
def build(
    onnx: Path = typer.Option(..., help="Folder written by `voltacache export`."),
    out: Path = typer.Option(..., help="Folder for the engines and engines.json."),
    backend: str = typer.Option("auto", help="auto (TensorRT where it can run), tensorrt or onnxruntime."),
    optimization_level: int = typer.Option(3, help="TensorRT builder optimization level (0-5)."),
    refittable: bool = typer.Option(
        False, help="TensorRT: engines whose weights can be refitted, so LoRAs apply without a rebuild."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace engines already in --out (they stay until the new ones are built and checked); "
        "a folder voltacache did not write is never replaced.",
    ),
):
    """Build static TensorRT engines (GPU) or optimized ONNX Runtime models (CPU)."""
    from rich.progress import Progress

    from .outputs import ENGINES, EXPORT, check_folder, refuse_overlap
    from .runtime.backends import BACKENDS, choose_backend
    from .specs import COMPONENTS

    if backend != "auto" and backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: use auto, {', '.join(BACKENDS)}")
    if not onnx.is_dir() or not EXPORT(onnx):
        what = "no such folder" if not onnx.exists() else "not an export (no manifest.json in it)"
        raise UsageError(f"--onnx {onnx}: {what}; give the folder `voltacache export` wrote")
    refuse_overlap(out, onnx, "--out", "--onnx")
    check_folder(out, ENGINES, force=force)

    from .compile.build import build_engines

    chosen, reason = choose_backend(backend)
    announce = f"backend: {chosen.name} ({escape(reason)})"  # printed soft-wrapped: one line in a log
    # The backend and the bar appear when the work starts (a refused --out or a folder that is no export
    # is one line on stderr); off a terminal, no bar, and the backend once the build is done.
    bars = Progress(console=err, disable=not err.is_terminal)
    task = bars.add_task("build", total=len(COMPONENTS))

    def progress(component):
        if err.is_terminal and not bars.live.is_started:
            err.print(announce, soft_wrap=True)
            bars.start()
        bars.update(task, description=component, completed=COMPONENTS.index(component))

    try:
        manifest = build_engines(
            onnx,
            out,
            chosen.name,
            optimization_level,
            progress=progress,
            force=force,
            refittable=refittable,
            reason=reason,
        )
        bars.update(task, description="done", completed=len(COMPONENTS))
    finally:
        bars.stop()
    if not err.is_terminal:
        err.print(announce, soft_wrap=True)
    if manifest.export.precision == "fp16" and chosen.name == "onnxruntime":
        err.print(
            "[yellow]note:[/] fp16 runs slower than fp32 on ONNX Runtime's CPU provider; export fp32 to serve on CPU"
        )
    print(out)


@app.command()
@user_errors
def calibrate(
    engines: Path = typer.Option(..., help="Folder written by `voltacache build`: the schedules are written there."),
    prompts: Path | None = typer.Option(
        None, help="A file of prompts like the ones served, one per line (default: four built-in prompts)."
    ),
    steps: str = typer.Option(
        ",".join(map(str, DEFAULT_STEPS)), help="Step counts to calibrate, e.g. 20,50 (requests use one of them)."
    ),
    intervals: str = typer.Option(
        ",".join(map(str, DEFAULT_INTERVALS)), help="Intervals N to place ceil(steps / N) full calls for."
    ),
    scheduler: str = typer.Option("ddim", help=", ".join(SCHEDULERS) + "."),
    guidance: float = typer.Option(Request.guidance, help="Guidance scale of the calibration runs."),
    seed: int = typer.Option(0, help="Seed of the first prompt (the next get seed + 1, ...)."),
    force: bool = typer.Option(
        False, "--force", help="Replace the engines' calibration (it stays until the new one is whole)."
    ),
):
    """Place DeepCache's full U-Net calls where they pay: calibrated schedules, written into the engines folder.

    For each step count and N, the schedule whose final latents are closest to uncached over the
    prompts, searched from uniform N (a few dozen generations per prompt, N and step count)."""
    from rich.progress import Progress
    from rich.table import Table

    from .generate import read_prompts
    from .pipeline.calibrate import calibrate as run_calibration
    from .pipeline.calibrate import parse_counts
    from .request import check_choice, check_number

    counts, ns = parse_counts(steps, "--steps", 2), parse_counts(intervals, "--intervals", 2)
    check_choice("--scheduler", scheduler, SCHEDULERS)
    check_number("--guidance", guidance, 0.0, MAX_GUIDANCE)
    texts = [line.text for line in read_prompts(prompts)] if prompts else DEFAULT_PROMPTS
    if not texts:
        raise UsageError(f"--prompts {prompts}: no prompts in it; one prompt per line")
    with Progress(console=err, disable=not err.is_terminal) as bars:
        task = bars.add_task("calibrating", total=None)
        data = run_calibration(
            engines,
            texts,
            counts,
            ns,
            scheduler,
            guidance,
            seed,
            force,
            lambda description: bars.update(task, description=f"generations, {description}", advance=1),
        )
    table = Table(title=f"calibrated DeepCache schedules, {len(texts)} prompts, {data['seconds']:.0f} s")
    for column in ("steps", "N", "full steps", "latent error vs uniform"):
        table.add_column(column)
    for count, run in data["steps"].items():
        for n, chosen in run["schedules"].items():
            error = run["latent_error"][n]
            ratio = error["calibrated"] / error["uniform"] if error["uniform"] else 1.0
            table.add_row(count, n, " ".join(map(str, chosen)), f"{ratio:.2f}x")
    Console().print(table)
    print(Path(engines) / SCHEDULES_FILE)


@app.command()
@user_errors
def deploy(
    engines: Path = typer.Option(..., help="Folder written by `voltacache build`."),
    repo: Path = typer.Option(
        ...,
        help="Model repository to write: a new or empty folder, or one deploy wrote before, which is generated "
        "output and is replaced whole once the new one is complete (no --force needed). Any other folder is "
        "refused, as is one that is, holds or lies inside --engines.",
    ),
    component_backend: str = typer.Option(
        "python", help="python (ONNX Runtime in a Python model: the CPU server), onnxruntime (NGC) or tensorrt."
    ),
    step_batching: bool = typer.Option(
        True,
        help="One denoiser batches the U-Net steps of every request in flight (requests join and leave at step "
        "boundaries). --no-step-batching: --denoiser-instances denoisers, one request each.",
    ),
    denoiser_instances: int | None = typer.Option(
        None, help="With --no-step-batching: denoiser instances, requests denoised in parallel (default 2)."
    ),
    cache: str = typer.Option("off", help="Cross-request cache index: off, a milvus-lite file, or a Milvus URL."),
    cache_embedder: str = typer.Option("clip", help="clip (the pipeline's pooled output) or minilm."),
    blob_store: str | None = typer.Option(None, help="Blob folder or s3://bucket/prefix (needed with a Milvus URL)."),
    cache_ttl: float = typer.Option(CacheSettings.ttl_s, help="Seconds an entry may be served."),
    cache_policy: str = typer.Option(CacheSettings.policy, help="Eviction: lcbfu, fifo, lifo, lru, lfu or random."),
    cache_max_entries: int | None = typer.Option(None, help="Capacity in entries."),
    cache_max_bytes: int | None = typer.Option(None, help="Capacity in bytes."),
    cache_threshold: float = CACHE_THRESHOLD,
    cache_bands: str = CACHE_BANDS,
    lora: list[str] = typer.Option(
        [], help="NAME=FILE: register a LoRA (.safetensors) that requests may name, with a scale. Repeatable."
    ),
    lora_resident: int | None = typer.Option(
        None, help=f"LoRA variants each engine keeps loaded (1-16; default {RESIDENT_VARIANTS})."
    ),
    drop_lora: list[str] = typer.Option(
        [], help="NAME: unregister a LoRA the repository registered before (they are kept otherwise). Repeatable."
    ),
):
    """Write a Triton model repository with the txt2img / img2img ensembles."""
    from .pipeline.lora import LoraFile
    from .serving.deploy import deploy as write_repository

    registered = {}
    for option in lora:
        name, sep, path = option.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--lora {option!r}: give NAME=FILE, e.g. --lora style=style.safetensors")
        if name in registered:
            raise UsageError(f"--lora {name}: registered twice; give each name once")
        registered[name] = LoraFile.open(name, Path(path), f"--lora {option}:")

    try:
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
    except BadConfiguration as e:  # deploy names the index option --cache
        raise BadConfiguration(str(e).replace("--cache-index ", "--cache ", 1)) from None
    print(
        write_repository(
            engines,
            repo,
            component_backend,
            denoiser_instances,
            settings,
            step_batching,
            registered,
            lora_resident,
            tuple(drop_lora),
        )
    )


@app.command()
@user_errors
def serve(
    repo: Path = typer.Option(..., help="Triton model repository written by `voltacache deploy`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes the server to the network)."),
    http_port: int = typer.Option(8000),
    grpc_port: int = typer.Option(8001),
    metrics_port: int = typer.Option(8002),
    cache_mb: int = typer.Option(256, help="Triton response cache size in MiB (exact duplicate requests)."),
    log_file: Path | None = typer.Option(
        None, help="Write tritonserver's log here (default: a temporary file, kept only if it fails)."
    ),
):
    """Start tritonserver on a model repository; stops cleanly on Ctrl-C or SIGTERM."""
    import signal
    import time

    from .errors import ServerFailed
    from .serving.server import TritonServer

    server = TritonServer(repo, host, http_port, grpc_port, metrics_port, cache_mb * 1024 * 1024, log_file)
    signals = []  # the handler only records: a lock taken in a signal handler can deadlock the main thread
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: signals.append(signum))
    try:
        server.start(cancelled=lambda: bool(signals))
    except KeyboardInterrupt:  # start() has stopped all it started
        name = signal.Signals(signals[0]).name
        raise fail(f"interrupted by {name} while tritonserver was starting; stopped it", 128 + signals[0]) from None
    with server:
        err.print(
            f"tritonserver ready: http {server.http_url}  grpc {server.grpc_url}  metrics {server.metrics_url}",
            soft_wrap=True,
        )
        for line in server.warnings():
            err.print(escape(line), style="yellow", soft_wrap=True)
        while not signals and server.process.poll() is None:
            time.sleep(0.25)
    if not signals:
        raise ServerFailed(f"tritonserver exited by itself (code {server.process.returncode}); the log is {server.log}")
    err.print("tritonserver stopped")


@app.command()
@user_errors
def generate(
    prompt: str | None = typer.Argument(None, help="Text prompt."),
    output: Path = typer.Option(Path("out.png"), "-o", "--output", help="Image file (several get _1, _2, ...)."),
    engines: Path | None = typer.Option(None, help="Engines folder: generate in process."),
    url: str | None = typer.Option(None, help="HOST:PORT of a voltacache Triton server: generate there."),
    protocol: str = typer.Option("grpc", help="grpc or http (with --url)."),
    prompts: Path | None = typer.Option(
        None, help="A file of prompts, one per line; line i (from 0) gets seed + i. Each image is written when done."
    ),
    concurrency: int = typer.Option(1, help="Requests in flight at once (with --url; in process they run one by one)."),
    negative_prompt: str = typer.Option(Request.negative_prompt, help="What the image should not show."),
    steps: int = typer.Option(Request.steps, help=f"Denoising steps (1-{MAX_STEPS})."),
    guidance: float = typer.Option(Request.guidance, help=f"Classifier-free guidance scale (0-{MAX_GUIDANCE:g})."),
    seed: int | None = typer.Option(None, help="Seed of the initial latents (default: random, reported)."),
    scheduler: str = typer.Option(Request.scheduler, help=", ".join(SCHEDULERS) + "."),
    cache_interval: int = typer.Option(
        Request.cache_interval,
        help="DeepCache: the full U-Net every N steps (1 off); calibrated spends as many full steps, placed elsewhere.",
    ),
    cache_schedule: str = typer.Option(
        Request.cache_schedule,
        help="DeepCache schedule: uniform, nonuniform, calibrated (after `voltacache calibrate`) or adaptive.",
    ),
    refresh_threshold: float | None = typer.Option(
        None,
        help="Adaptive DeepCache: refresh once the output has changed this much (summed relative L1) since the "
        f"last refresh; lower is closer to uncached (default {DEFAULT_REFRESH_THRESHOLD}).",
    ),
    height: int | None = typer.Option(None, help="Must equal the engines' static height."),
    width: int | None = typer.Option(None, help="Must equal the engines' static width."),
    init_image: Path | None = typer.Option(None, help="img2img: start from this image (resized to the engines' size)."),
    strength: float | None = typer.Option(
        None,
        help="img2img and inpainting: how much of the schedule to run (0-1]; 1 starts from noise. "
        f"Default: diffusers' ({IMG2IMG_STRENGTH} img2img, {INPAINT_STRENGTH} inpainting).",
    ),
    mask_image: Path | None = typer.Option(
        None,
        help="Inpainting (with --init-image): repaint where this mask is white (grayscale, binarized at 0.5, "
        "resized to the engines' size); an inpainting model (--preset inpaint-tiny) reads it in its U-Net.",
    ),
    original_size: str | None = typer.Option(
        None, help="SDXL size conditioning: HEIGHT,WIDTH (default: the engines')."
    ),
    crop_top_left: str | None = typer.Option(None, help="SDXL size conditioning: TOP,LEFT (default: 0,0)."),
    target_size: str | None = typer.Option(None, help="SDXL size conditioning: HEIGHT,WIDTH (default: the engines')."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object per image."),
    force: bool = typer.Option(False, help="Replace image files that exist."),
    cache: str = typer.Option(Request.cache_mode, help="Cross-request cache for this request: on, off or refresh."),
    cache_index: str | None = typer.Option(
        None, help="In process: the cache index (milvus-lite file or Milvus URL); none: no cache."
    ),
    cache_embedder: str = typer.Option("clip", help="In process: clip (the pipeline's pooled output) or minilm."),
    blob_store: str | None = typer.Option(None, help="In process: blob folder or s3://bucket/prefix."),
    cache_threshold: float = CACHE_THRESHOLD,
    cache_bands: str = CACHE_BANDS,
    lora: list[str] = typer.Option(
        [],
        help="A LoRA, applied to the engines without rebuilding them: FILE[:SCALE] in process (.safetensors, "
        "diffusers or kohya layout), NAME[:SCALE] of one the server registered (deploy --lora). Repeatable.",
    ),
):
    """Generate images in process (--engines) or through Triton (--url): the same request, the same images."""
    from .generate import Batch, Prompt, generate_in_process, generate_served, read_prompts
    from .images import read_image, read_mask
    from .pipeline.lora import lora_options

    if (engines is None) == (url is None):
        raise UsageError("give exactly one of --engines DIR (in process) or --url HOST:PORT (Triton)")
    if prompts is not None and prompt is not None:
        raise UsageError("give a prompt or --prompts FILE, not both")
    if url is not None and (cache_index is not None or blob_store is not None):
        raise UsageError(
            "--cache-index / --blob-store: only in process (--engines); a server's cache is set by `voltacache deploy "
            "--cache`, and --cache on|off|refresh chooses it per request"
        )
    if engines is not None and concurrency != 1:
        raise UsageError("--concurrency: in process requests run one at a time; serve them (--url) to run several")
    if concurrency < 1:
        raise UsageError(f"--concurrency {concurrency}: at least 1")
    if mask_image is not None and init_image is None:
        raise UsageError("--mask-image: inpainting repaints part of an image; give it with --init-image")
    if strength is not None and init_image is None:
        raise UsageError("--strength: how much of an init image is repainted; give it with --init-image")
    lines = read_prompts(prompts) if prompts else [Prompt(0, prompt)] if prompt else []
    if not lines:
        raise UsageError("give a prompt, or --prompts FILE with at least one line")
    lora_files, loras = lora_options(lora, files=engines is not None)
    template = Request(
        prompt if prompts is None else "(each line's own prompt)",
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        seed=seed,
        scheduler=scheduler,
        cache_interval=cache_interval,
        cache_schedule=cache_schedule,
        init_image=read_image(init_image, "--init-image") if init_image else None,
        strength=strength,
        cache_mode=cache,
        height=height,
        width=width,
        original_size=parse_pair(original_size, "--original-size"),
        crop_top_left=parse_pair(crop_top_left, "--crop-top-left"),
        target_size=parse_pair(target_size, "--target-size"),
        refresh_threshold=refresh_threshold,
        loras=loras,
        mask_image=read_mask(mask_image, "--mask-image") if mask_image else None,
    ).check()  # the options once (a file's lines each with its own request)
    if engines is not None:
        from .runtime.manifests import read_engine_manifest

        per_request = read_engine_manifest(engines).export.batch
        batch = Batch(lines, template, output, per_request, force)
        settings = CacheSettings(
            cache_index, cache_embedder, blob_store, semantic_threshold=cache_threshold, bands=cache_bands
        )
        records = generate_in_process(engines, batch, settings, lora_files)
    else:
        from .serving.client import Client

        per_request, _, _ = Client(url, protocol).image_shape()
        batch = Batch(lines, template, output, per_request, force)
        records = generate_served(url, protocol, batch, concurrency)
    try:
        for record in records:
            print(json.dumps(record) if json_output else record["path"], flush=True)
            if not json_output:
                err.print(
                    f"{escape(record['path'])}: seed {record['seed']}, {record['steps_computed']} steps computed, "
                    f"cache {record['cache']}, {record['seconds']:.2f} s",
                    soft_wrap=True,
                )
    except KeyboardInterrupt:
        raise fail(f"interrupted: {batch.written} of {len(batch.paths)} images written (kept)", 130) from None
    if batch.failures and len(lines) == 1:  # one prompt: its failure is the command's, said once
        raise batch.failures[0].error
    for failure in batch.failures:
        print(f"error: {failure}", file=sys.stderr)
    if batch.failures:
        raise fail(f"{len(batch.failures)} of {len(lines)} prompts failed; the other images are written", 1)


def parse_pair(text: str | None, arg: str) -> tuple[int, int] | None:
    """`--original-size 1024,768` -> (1024, 768); Request.check judges the numbers."""
    if text is None:
        return None
    try:
        first, second = (int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"{arg} {text!r}: give two integers, e.g. 1024,1024") from None
    return first, second


@app.command("check-shapes")
@user_errors
def check_shapes(
    image: Path = typer.Argument(..., help="An image of the shapes preset."),
    caption: str = typer.Argument(..., help='Its prompt: "a {color} {shape} on a {background} background".'),
):
    """Read the shape, its color and the background off an image and compare them with the caption."""
    from dataclasses import asdict

    from . import images
    from .shapes.checker import compare, read_image

    reading = read_image(images.read_image(image, "IMAGE"))
    try:
        verdict = compare(reading, caption) | {"read": asdict(reading)}
    except ValueError as e:
        raise UsageError(f"CAPTION: {e}") from None
    print(json.dumps(verdict))
    if not verdict["all_ok"]:
        raise typer.Exit(1)


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
    precisions: str = typer.Option("fp32", help="voltacache's precisions: fp32, int8 (quantized U-Nets) or both."),
    name: str = typer.Option("bench", help="Name of the JSON and the figures."),
    out: Path | None = typer.Option(None, help="JSON results (default docs/results/NAME.json)."),
    figures: Path = typer.Option(Path("docs/figures"), help="Folder for the PNG plots."),
    isolate: bool = typer.Option(
        False,
        help="Each group (diffusers+DeepCache, voltacache, Triton) in its own process, one after the other: "
        "for models whose weights fit in memory once but not three times (SDXL on 24 GiB).",
    ),
):
    """Benchmark against diffusers and DeepCache, side by side: seconds per image, speedups, plots."""
    import importlib.util

    from .compile.checkpoint import check_model_path

    def ints(text, option="--intervals"):
        try:
            values = tuple(int(x) for x in text.split(",") if x)
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise UsageError(f"{option} {text!r}: whole numbers of 1 or more, separated by commas, e.g. 1,2,3")
        return values

    for option, value in (("--steps", steps), ("--repeats", repeats)):
        if value < 1:
            raise UsageError(f"{option} {value}: 1 or more")
    if size < 64 or size % 64:
        raise UsageError(f"--size {size}: a positive multiple of 64 pixels, e.g. 256")
    check_model_path(model)
    missing = [m for m in ("DeepCache", "matplotlib", "psutil") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"bench compares with {missing[0]}, which is not installed: pip install -e '.[bench]' (`make bench` does)"
        )

    from .bench import BenchConfig, main, table

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
        ints(deepcache_intervals, "--deepcache-intervals"),
        names(branches),
        names(triton_branches),
        out or Path(f"docs/results/{name}.json"),
        figures,
        name=name,
        precisions=names(precisions),
        isolate=isolate,
    )
    result = main(cfg, console=err)
    print(table(result))
    print(f"results: {cfg.out}; figures: {', '.join(result['figures'])}")


def _open_store(index: str, blob_store: str | None, embedder: str | None):
    """The store of the cache the index holds (embedder and width read from the index), or None."""
    from .cache.admin import open_existing

    return open_existing(index, blob_store, embedder)


CACHE_INDEX = typer.Option(..., "--cache-index", help="The cache index: milvus-lite file or Milvus server URL.")
CACHE_EMBEDDER = typer.Option("clip", help="Which embedder's entries: clip or minilm.")
CACHE_CHOICE = typer.Option(
    None,
    "--embedder",
    help="Which cache, when the index holds several: clip, minilm, or NAME:DIM (e.g. clip:768).",
)
BLOB_STORE = typer.Option(None, help="Blob folder or s3://bucket/prefix (default: beside a file index).")


@cache_app.command("stats")
@user_errors
def cache_stats(
    index: str = CACHE_INDEX,
    embedder: str | None = CACHE_CHOICE,
    blob_store: str | None = BLOB_STORE,
):
    """Entries, bytes, hits and evictions of the cache."""
    from .cache.admin import empty_stats

    store = _open_store(index, blob_store, embedder)
    if store is None:
        print(json.dumps(empty_stats(index), indent=2))
        return
    with store:
        print(json.dumps(store.stats(), indent=2))


@cache_app.command("clear")
@user_errors
def cache_clear(
    index: str = CACHE_INDEX,
    embedder: str | None = CACHE_CHOICE,
    blob_store: str | None = BLOB_STORE,
    force: bool = typer.Option(
        False, help="Also on an index that cannot be read: set it aside (<index>.corrupt-<time>) and remove its blobs."
    ),
):
    """Remove every entry and blob; prints how many entries it removed."""
    from .cache.admin import clear

    report = clear(index, blob_store, embedder, force)
    print(json.dumps(report))
    if report.get("repaired"):
        err.print(
            f"cache cleared: {escape(index)} could not be read and was set aside as {escape(report['set_aside'])}; "
            f"a fresh index started, {report['blobs_removed']} blobs removed",
            soft_wrap=True,
        )
    else:
        err.print(f"cache cleared: removed {report['removed']} entries", soft_wrap=True)


@cache_app.command("purge-expired")
@user_errors
def cache_purge(
    index: str = CACHE_INDEX,
    embedder: str | None = CACHE_CHOICE,
    blob_store: str | None = BLOB_STORE,
):
    """Remove entries past their TTL and blobs no entry points at."""
    store = _open_store(index, blob_store, embedder)
    if store is None:
        print(json.dumps({"purged": 0}))
        return
    with store:
        print(json.dumps({"purged": store.purge_expired()}))


@cache_app.command("repair")
@user_errors
def cache_repair(
    index: str = CACHE_INDEX,
    blob_store: str | None = BLOB_STORE,
    purge_blobs: bool = typer.Option(
        False, help="Also remove the blobs (the set-aside index still points at them; kept by default)."
    ),
):
    """A milvus-lite index that no longer opens: set it aside as <index>.corrupt-<time> (never deleted)
    and start a fresh one. An index that reads back is left as it is."""
    from .cache.admin import repair

    report = repair(index, blob_store, purge_blobs)
    print(json.dumps(report))
    if not report["repaired"]:
        err.print(f"{escape(index)} reads back: nothing to repair", soft_wrap=True)
        return
    blobs = (
        f"{report['blobs_removed']} blobs removed"
        if purge_blobs
        else f"{report['blobs_kept']} blobs kept for it (`cache purge-expired` removes them)"
    )
    err.print(
        f"repaired: {escape(index)} set aside as {escape(report['set_aside'])}; a fresh index started; {blobs}",
        soft_wrap=True,
    )


@cache_app.command("warm")
@user_errors
def cache_warm(
    prompts: Path = typer.Option(..., help="A file of prompts, one per line."),
    engines: Path = typer.Option(..., help="Engines folder (the cache is scoped to their model)."),
    index: str = CACHE_INDEX,
    embedder: str = CACHE_EMBEDDER,
    blob_store: str | None = BLOB_STORE,
    steps: int = typer.Option(Request.steps),
    guidance: float = typer.Option(Request.guidance),
    scheduler: str = typer.Option(Request.scheduler),
    seed: int | None = typer.Option(None, help="Seed of the first prompt (line i gets seed + i); default random."),
    out: Path = typer.Option(Path("build/warm/img.png"), help="Where the generated images go."),
    force: bool = typer.Option(False, help="Replace image files that exist."),
):
    """Generate and store the prompts of a file (refresh mode: each is computed and stored)."""
    from .generate import Batch, generate_in_process, read_prompts
    from .runtime.manifests import read_engine_manifest

    lines = read_prompts(prompts)
    if not lines:
        raise UsageError(f"--prompts {prompts}: no prompt in it")
    template = Request("(each line's own prompt)", steps=steps, guidance=guidance, seed=seed, scheduler=scheduler)
    template = template.replace(cache_mode="refresh").check()
    batch = Batch(lines, template, out, read_engine_manifest(engines).export.batch, force)
    records = list(generate_in_process(engines, batch, CacheSettings(index, embedder, blob_store)))
    for failure in batch.failures:
        print(f"error: {failure}", file=sys.stderr)
    err.print(f"warmed {len(records)} entries")
    if batch.failures:
        raise typer.Exit(1)


SEARCH_URL = typer.Option(None, help="HOST:PORT of a voltacache Triton server: search its cache there.")
SEARCH_INDEX = typer.Option(None, "--cache-index", help="In process: the cache index (milvus-lite file or Milvus URL).")
SEARCH_ENGINES = typer.Option(None, help="In process: the engines whose model's entries to show (and embed with).")
SEARCH_OUT = typer.Option(None, help="A new folder for the images (PNG) and search.json.")
SEARCH_FORCE = typer.Option(False, help="Replace a folder of search results --out names.")
SEARCH_THUMBNAIL = typer.Option(0, help="Longest side of each image, in pixels (0: as stored).")
SEARCH_PROTOCOL = typer.Option("grpc", help="grpc or http (with --url).")


def _search(query, url, protocol, index, engines, embedder, blob_store):
    """`query` through a server (--url) or in process on an index (--cache-index)."""
    from .cache.search import search_index

    query = query.check()
    if (url is None) == (index is None):
        raise UsageError("give exactly one of --url HOST:PORT (a server's cache) or --cache-index INDEX (in process)")
    if url is not None:
        if engines is not None or blob_store is not None:
            raise UsageError("--engines and --blob-store are for in process (--cache-index); the server knows its own")
        from .serving.client import Client

        return Client(url, protocol).search(query)
    return search_index(query, index, blob_store, engines, embedder)


def _search_and_show(query, out: Path | None, force: bool, *where) -> None:
    """Check --out first (before any compute), search, then show and write what was found."""
    if out is not None:
        check_folder(out, SEARCH_RESULTS, force=force)
    _show(_search(query, *where), query, out, force)


def _show(found, query, out: Path | None, force: bool) -> None:
    """A table on stdout; with --out, each image as a PNG and every record in search.json."""
    import time as clock

    from .generate import save

    if not found:
        err.print("nothing found: the cache holds no entry of this model for that", soft_wrap=True)
    for rank, f in enumerate(found, 1):
        when = clock.strftime("%Y-%m-%d %H:%M", clock.localtime(f.created))
        size = f"{f.params.get('width', '?')}x{f.params.get('height', '?')}"
        similarity = f"{f.similarity:.3f}" if query.embeds else "-"
        print(
            f"{rank:>3}  {similarity:>6}  hits {f.hits:<4} seed {f.seed:<11} steps {f.params.get('steps', '?'):<4} "
            f"{size:<9} {when}  {f.prompt}"
        )
    if out is None:
        return
    with staged_output(out, SEARCH_RESULTS, force=force) as stage:
        records = []
        for rank, f in enumerate(found, 1):
            record = f.record()
            if f.image is not None:
                record["file"] = f"{rank:02d}-{f.id[:12]}.png"
                save(f.image, stage / record["file"])
            records.append(record)
        document = {"query": dataclasses.asdict(query), "results": records}
        (stage / "search.json").write_text(json.dumps(document, indent=2))
    err.print(f"wrote {len(found)} results to {escape(str(out))}", soft_wrap=True)


@cache_app.command("search")
@user_errors
def cache_search(
    prompt: str = typer.Argument(..., help="The prompt to look near."),
    top: int = typer.Option(DEFAULT_TOP, help=f"How many entries (at most {MAX_TOP})."),
    prompts: bool = typer.Option(False, "--prompts", help="Recommend the stored prompts nearest PROMPT (no images)."),
    thumbnail: int = SEARCH_THUMBNAIL,
    out: Path | None = SEARCH_OUT,
    force: bool = SEARCH_FORCE,
    url: str | None = SEARCH_URL,
    protocol: str = SEARCH_PROTOCOL,
    index: str | None = SEARCH_INDEX,
    engines: Path | None = SEARCH_ENGINES,
    embedder: str | None = CACHE_CHOICE,
    blob_store: str | None = BLOB_STORE,
):
    """The stored images of this model nearest a prompt, most similar first (or, with --prompts,
    the stored prompts nearest it)."""
    from .cache.search import SearchQuery

    query = SearchQuery("prompts" if prompts else "images", prompt, top, thumbnail)
    _search_and_show(query, out, force, url, protocol, index, engines, embedder, blob_store)


@cache_app.command("list")
@user_errors
def cache_list(
    order: str = typer.Option("newest", help="newest or most-used first."),
    top: int = typer.Option(20, help=f"How many entries (at most {MAX_TOP})."),
    thumbnail: int = SEARCH_THUMBNAIL,
    out: Path | None = SEARCH_OUT,
    force: bool = SEARCH_FORCE,
    url: str | None = SEARCH_URL,
    protocol: str = SEARCH_PROTOCOL,
    index: str | None = SEARCH_INDEX,
    engines: Path | None = typer.Option(None, help="In process: only this model's entries (default: every model's)."),
    embedder: str | None = CACHE_CHOICE,
    blob_store: str | None = BLOB_STORE,
):
    """What the cache holds: its stored images, newest or most used first."""
    from .cache.search import SearchQuery

    if order not in LISTING_ORDERS:
        raise UsageError(f"--order {order!r}: choose one of {', '.join(LISTING_ORDERS)}")
    query = SearchQuery(order, "", top, thumbnail)
    _search_and_show(query, out, force, url, protocol, index, engines, embedder, blob_store)


@app.command("ui")
@user_errors
def ui(
    url: str = typer.Option(..., help="HOST:PORT of a voltacache Triton server (gRPC, or HTTP with --protocol)."),
    protocol: str = typer.Option("grpc", help="grpc or http."),
    host: str = typer.Option("127.0.0.1", help="Address the page listens on (0.0.0.0: every interface)."),
    port: int = typer.Option(7860, help="Port the page listens on."),
):
    """A web page over a served deployment: recommendations as you type, the stored images nearest
    your prompt, and Generate through the ensemble, with the cache layer that answered."""
    from .serving.client import Client
    from .serving.server import check_port
    from .ui.app import serve_page

    check_port("--port", host, port)  # before anything: a port that cannot be bound is the command line's
    client = Client(url, protocol)
    client.image_shape()  # a server that does not answer: one line now, not on the first click
    err.print(f"voltacache ui on http://{host}:{port} (Ctrl-C stops it)", soft_wrap=True)
    serve_page(client, host, port)


def main():
    """The entry point: every failure one line, exit 2 for a command line that cannot be parsed (click's
    own messages, folded into one line), 130 for Ctrl-C."""
    import signal

    from typer._click import exceptions as parsing  # typer 0.29 carries its own click (pyproject pins it)

    try:
        try:
            code = app(standalone_mode=False)
        finally:  # the command is over, its outputs whole: a late Ctrl-C must not change what it did or say more
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except parsing.NoArgsIsHelpError as e:
        print(e.format_message())
        code = 2
    except parsing.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        print("error: " + " ".join(e.format_message().split()) + hint, file=sys.stderr)
        code = 2
    except typer.Abort:  # Ctrl-C while the command line was read
        print("error: interrupted", file=sys.stderr)
        code = 130
    except typer.Exit as e:
        code = e.exit_code
    except KeyboardInterrupt:  # between the command's end and here
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)
