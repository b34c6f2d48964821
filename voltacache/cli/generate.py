"""`voltacache generate | check-shapes | bench`: images in process or served, and how they compare."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape

from ..cache.layers import CacheSettings
from ..errors import UsageError
from ..request import DEFAULT_REFRESH_THRESHOLD, IMG2IMG_STRENGTH, INPAINT_STRENGTH, MAX_GUIDANCE, MAX_STEPS, Request
from ..schedulers import SCHEDULERS
from .app import CACHE_BANDS, CACHE_THRESHOLD, app, err, fail, user_errors


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
    height: int | None = typer.Option(
        None, help="Image height: one of the sizes the engines serve (export --sizes; default: the first)."
    ),
    width: int | None = typer.Option(None, help="Image width: one of the sizes the engines serve."),
    init_image: Path | None = typer.Option(None, help="img2img: start from this image (resized to the image's size)."),
    strength: float | None = typer.Option(
        None,
        help="img2img and inpainting: how much of the schedule to run (0-1]; 1 starts from noise. "
        f"Default: diffusers' ({IMG2IMG_STRENGTH} img2img, {INPAINT_STRENGTH} inpainting).",
    ),
    mask_image: Path | None = typer.Option(
        None,
        help="Inpainting (with --init-image): repaint where this mask is white (grayscale, binarized at 0.5, "
        "resized to the image's size); an inpainting model (--preset inpaint-tiny) reads it in its U-Net.",
    ),
    original_size: str | None = typer.Option(None, help="SDXL size conditioning: HEIGHT,WIDTH (default: the image's)."),
    crop_top_left: str | None = typer.Option(None, help="SDXL size conditioning: TOP,LEFT (default: 0,0)."),
    target_size: str | None = typer.Option(None, help="SDXL size conditioning: HEIGHT,WIDTH (default: the image's)."),
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
    controlnet: list[str] = typer.Option(
        [],
        help="A ControlNet the engines have (export --controlnet NAME=...), NAME[:SCALE] (conditioning scale, "
        "default 1); repeat for several: their residuals are summed. Needs --control-image.",
    ),
    control_image: list[Path] = typer.Option(
        [],
        help="The ControlNets' control image (one for all, or one per --controlnet, in order); resized to the image.",
    ),
    control_preprocess: str = typer.Option(
        "none", help="none (the control image as given) or canny (Canny edges of a photo, OpenCV, thresholds 100/200)."
    ),
    control_start: float = typer.Option(Request.control_start, help="ControlNet: the share of steps before it acts."),
    control_end: float = typer.Option(Request.control_end, help="ControlNet: the share of steps after which it stops."),
    control_residuals: str = typer.Option(
        Request.control_residuals,
        help="ControlNet with DeepCache: reuse (the last full step's residuals on shallow steps: the ControlNets run "
        "on full steps only) or fresh (they run every step).",
    ),
):
    """Generate images in process (--engines) or through Triton (--url): the same request, the same images."""
    from ..generate import Batch, Prompt, generate_in_process, generate_served, read_prompts
    from ..images import PREPROCESSORS, read_image, read_mask
    from ..pipeline.lora import lora_options
    from ..request import ControlNetRequest

    if (engines is None) == (url is None):
        raise UsageError("give exactly one of --engines DIR (in process) or --url HOST:PORT (Triton)")
    if prompts is not None and prompt is not None:
        raise UsageError("give a prompt or --prompts FILE, not both")
    if url is not None and (cache_index is not None or blob_store is not None):
        raise UsageError(
            "--cache-index / --blob-store: only in process (--engines); a server's cache is set by `voltacache deploy "
            "--cache`, and --cache on|off|refresh chooses it per request"
        )
    if blob_store is not None and cache_index is None:
        raise UsageError("--blob-store: where a cache keeps its images; give it with --cache-index")
    if engines is not None and concurrency != 1:
        raise UsageError("--concurrency: in process requests run one at a time; serve them (--url) to run several")
    if concurrency < 1:
        raise UsageError(f"--concurrency {concurrency}: at least 1")
    if mask_image is not None and init_image is None:
        raise UsageError("--mask-image: inpainting repaints part of an image; give it with --init-image")
    if strength is not None and init_image is None:
        raise UsageError("--strength: how much of an init image is repainted; give it with --init-image")
    if control_image and not controlnet:
        raise UsageError("--control-image: give it with --controlnet NAME, the ControlNet it steers")
    if controlnet and not control_image:
        raise UsageError("--controlnet: give the control image it follows with --control-image")
    if control_preprocess not in PREPROCESSORS:
        raise UsageError(f"--control-preprocess {control_preprocess!r}: choose one of {', '.join(PREPROCESSORS)}")
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
        controlnets=tuple(ControlNetRequest.parse(text) for text in controlnet),
        control_images=tuple(
            PREPROCESSORS[control_preprocess](read_image(path, "--control-image")) for path in control_image
        ),
        control_start=control_start,
        control_end=control_end,
        control_residuals=control_residuals,
    ).check()  # the options once (a file's lines each with its own request)
    if engines is not None:
        from ..runtime.manifests import read_engine_manifest

        per_request = read_engine_manifest(engines).export.batch
        batch = Batch(lines, template, output, per_request, force)
        settings = CacheSettings(
            cache_index, cache_embedder, blob_store, semantic_threshold=cache_threshold, bands=cache_bands
        )
        records = generate_in_process(engines, batch, settings, lora_files)
    else:
        from ..serving.client import Client

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

    from .. import images
    from ..shapes.checker import compare, read_image

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
    out: Path | None = typer.Option(None, help="JSON results (default build/results/NAME.json)."),
    figures: Path = typer.Option(Path("build/figures"), help="Folder for the PNG plots."),
    isolate: bool = typer.Option(
        False,
        help="Each group (diffusers+DeepCache, voltacache, Triton) in its own process, one after the other: "
        "for models whose weights fit in memory once but not three times (SDXL on 24 GiB).",
    ),
):
    """Benchmark against diffusers and DeepCache, side by side: seconds per image, speedups, plots."""
    import importlib.util

    from ..compile.checkpoint import check_model_path
    from ..compile.options import is_deepcache_branch

    def ints(text, option="--intervals"):
        try:
            values = tuple(int(x) for x in text.split(",") if x)
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise UsageError(f"{option} {text!r}: whole numbers of 1 or more, separated by commas, e.g. 1,2,3")
        return values

    def names(text):
        return tuple(x for x in text.split(",") if x)

    def branch_names(text, option):
        values = names(text)
        if not all(is_deepcache_branch(x) for x in values):
            raise UsageError(f"{option} {text!r}: block, or DeepCache branch numbers such as 0, e.g. block,0")
        return values

    for option, value in (("--steps", steps), ("--repeats", repeats)):
        if value < 1:
            raise UsageError(f"{option} {value}: 1 or more")
    if size < 64 or size % 64:
        raise UsageError(f"--size {size}: a positive multiple of 64 pixels, e.g. 256")
    # every argument is checked before the extras are: a user fixing one mistake is not sent to install first
    voltacache_intervals, helper_intervals = ints(intervals), ints(deepcache_intervals, "--deepcache-intervals")
    compared, served = branch_names(branches, "--branches"), branch_names(triton_branches, "--triton-branches")
    check_model_path(model)
    missing = [m for m in ("DeepCache", "matplotlib", "psutil") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"bench compares with {missing[0]}, which is not installed: pip install -e '.[bench]' (`make bench` does)"
        )

    from ..bench import BenchConfig, main, table

    cfg = BenchConfig(
        model,
        workdir,
        size,
        steps,
        7.5,
        repeats,
        voltacache_intervals,
        helper_intervals,
        compared,
        served,
        out or Path(f"build/results/{name}.json"),
        figures,
        name=name,
        precisions=names(precisions),
        isolate=isolate,
    )
    result = main(cfg, console=err)
    print(table(result))
    print(f"results: {cfg.out}; figures: {', '.join(result['figures'])}")
