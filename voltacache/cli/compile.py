"""`voltacache init-tiny | export | build | calibrate`: making engines (voltacache.compile)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from ..compile.options import DEFAULT_PROMPT_CHUNKS
from ..errors import UsageError
from ..outputs import check_file
from ..pipeline.calibrate import DEFAULT_INTERVALS, DEFAULT_PROMPTS, DEFAULT_STEPS
from ..pipeline.calibration import SCHEDULES_FILE
from ..request import MAX_GUIDANCE, MAX_SEED, Request
from ..schedulers import SCHEDULERS
from .app import app, err, user_errors


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
        "9-channel U-Net), controlnet-tiny / controlnet-sdxl-tiny / controlnet-sd15 (a ControlNet for tiny, "
        "sdxl-tiny or sd15, random weights), shapes-controlnet (trained on shapes: places the shape where a mask "
        "image puts it), or the full architectures with random "
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
    from ..compile.controlnets import PRESETS as CONTROLNET_PRESETS
    from ..compile.controlnets import TRAINED as TRAINED_CONTROLNETS
    from ..compile.presets import PRESETS, write_pipeline

    controlnets = (*CONTROLNET_PRESETS, *TRAINED_CONTROLNETS)
    if preset not in PRESETS and preset not in controlnets:
        raise UsageError(f"--preset {preset!r}: choose one of {', '.join((*PRESETS, *controlnets))}")
    if preset in controlnets:  # a ControlNetModel folder, for export --controlnet NAME=OUT
        from ..compile.controlnets import write_controlnet

        if single_file:
            raise UsageError("--single-file: writes pipelines only; a ControlNet preset is written as a folder")
        print(write_controlnet(out, preset, seed, force=force))
        return
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed {seed}: use a whole number from 0 to {MAX_SEED}")
    if single_file:
        from ..compile.single_file import is_our_single_file

        # refused before anything is written
        check_file(
            single_file, force=force, ours=is_our_single_file, arg="--single-file", what="single-file checkpoint"
        )
    write_pipeline(out, preset, seed, force=force)
    if single_file:
        from ..compile.checkpoint import load_pipeline
        from ..compile.single_file import save_single_file

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
        help="fp16 (weights and compute), fp32 (what a CPU serves), int8 (the U-Nets calibrated and quantized, "
        "QDQ: ONNX Runtime's or OpenVINO's int8 kernels on CPU, an explicitly quantized TensorRT engine on GPU) or "
        "bf16 (fp32 graphs run on the CPU's bf16 units: AVX-512 BF16 or AMX, with `build --backend openvino`).",
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
    sizes: str | None = typer.Option(
        None,
        help="Several image sizes served by one engine set, WIDTHxHEIGHT comma-separated, the first the default "
        "(e.g. 512x512,768x512,512x768), or sdxl: SDXL's aspect-ratio buckets. Replaces --height/--width.",
    ),
    opset: int = typer.Option(23, help="23: fused ONNX Attention (TensorRT >= 10.14); 18: unfused, TensorRT fuses it."),
    max_prompt_chunks: int = typer.Option(
        DEFAULT_PROMPT_CHUNKS,
        help="Prompts of up to this many chunks of 75 tokens, each encoded on its own and joined as the "
        "community's tools do (1: CLIP's 77 tokens, longer prompts refused).",
    ),
    deepcache_branch: str = typer.Option(
        "block", help="block (deep feature = input of up_blocks[-1]) or 0 (shallowest)."
    ),
    config: Path | None = typer.Option(
        None, help="diffusers config folder for a single-file checkpoint (default SD 1.5)."
    ),
    controlnet: list[str] = typer.Option(
        [],
        help="NAME=PATH: export this ControlNet (a diffusers ControlNetModel folder or a .safetensors file) as the "
        "engine controlnet_NAME, and U-Nets that take its residuals; repeat for several.",
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

    from ..compile.checkpoint import check_model_path
    from ..compile.controlnets import check_controlnet_path, parse_controlnet
    from ..compile.options import ExportOptions, parse_batch_sizes, parse_sizes
    from ..outputs import EXPORT, check_folder, refuse_overlap
    from ..specs import COMPONENTS, controlnet_component

    calibration = None
    if calibration_prompts is not None or calibration_steps is not None:
        from ..compile.options import Calibration

        calibration = Calibration.from_file(calibration_prompts, calibration_steps or Calibration.steps)
    if sizes is not None and (height is not None or width is not None):
        raise UsageError("--sizes names every size, the first the default: leave out --height and --width")
    options = ExportOptions(
        precision=precision,
        batch=batch,
        height=height,
        width=width,
        opset=opset,
        deepcache_branch=deepcache_branch,
        calibration=calibration,
        batch_sizes=parse_batch_sizes(batch_sizes) if batch_sizes is not None else None,
        max_prompt_chunks=max_prompt_chunks,
        sizes=parse_sizes(sizes) if sizes is not None else (),
        controlnets=tuple(parse_controlnet(text) for text in controlnet),
    )
    options.check()  # before torch and the exporter are imported: a mistake is refused at once
    check_model_path(model, allow_pickle)
    for name, path in options.controlnets:
        check_controlnet_path(name, path, allow_pickle)
        refuse_overlap(out, path, "--out", f"--controlnet {name}")
    refuse_overlap(out, model, "--out", "--model")
    check_folder(out, EXPORT, force=force)

    from ..compile.export import STAGES, export_model

    columns = (
        TextColumn("{task.description:<13}"),
        BarColumn(),
        TextColumn("{task.fields[stage]:<9}"),
        TimeElapsedColumn(),
    )
    # The bars appear when the work starts (a refused --out or a bad checkpoint is one line on stderr),
    # on a terminal only: a log gets the report below.
    bars = Progress(*columns, console=err, disable=not err.is_terminal)
    components = (*COMPONENTS, *(controlnet_component(name) for name, _ in options.controlnets))
    tasks = {c: bars.add_task(c, total=len(STAGES), stage="waiting", start=False) for c in components}

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
    backend: str = typer.Option(
        "auto",
        help="auto (TensorRT where it runs; else the fastest of the CPU backends on this export, timed here), "
        "onnxruntime, openvino or tensorrt.",
    ),
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

    from ..outputs import ENGINES, EXPORT, check_folder, refuse_overlap
    from ..runtime.backends import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: use auto, {', '.join(BACKENDS)}")
    if not onnx.is_dir() or not (onnx / EXPORT.marker).is_file():
        what = "no such folder" if not onnx.exists() else f"not an export (no {EXPORT.marker} in it)"
        raise UsageError(f"--onnx {onnx}: {what}; give the folder `voltacache export` wrote")
    if not EXPORT(onnx):  # a torn or foreign manifest: read_manifest says which, and what to do
        from ..runtime.manifests import read_manifest

        read_manifest(onnx)
    refuse_overlap(out, onnx, "--out", "--onnx")
    check_folder(out, ENGINES, force=force)

    from ..compile.build import build_engines, select_backend
    from ..runtime.manifests import read_manifest

    def timing():  # it takes a moment: say so, once the export and the request are known to be sound
        err.print("choosing a backend: timing the ones that run here on this export", soft_wrap=True)

    chosen, reason, selection = select_backend(backend, read_manifest(onnx), onnx, timing)
    announce = f"backend: {chosen.name} ({escape(reason)})"  # printed soft-wrapped: one line in a log
    # The backend and the bar appear when the work starts (a refused --out or a folder that is no export
    # is one line on stderr); off a terminal, no bar, and the backend once the build is done.
    bars = Progress(console=err, disable=not err.is_terminal)
    components = list(read_manifest(onnx).components)  # the model's, then each ControlNet's
    task = bars.add_task("build", total=len(components))

    def progress(component):
        if err.is_terminal and not bars.live.is_started:
            err.print(announce, soft_wrap=True)
            bars.start()
        bars.update(task, description=component, completed=components.index(component))

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
            selection=selection,
        )
        bars.update(task, description="done", completed=len(components))
    finally:
        bars.stop()
    if not err.is_terminal:
        err.print(announce, soft_wrap=True)
    if manifest.export.precision in ("bf16", "int8"):
        err.print(measured_error(manifest), soft_wrap=True)
    if manifest.export.precision == "fp16" and chosen.name == "onnxruntime":
        err.print(
            "[yellow]note:[/] fp16 runs slower than fp32 on ONNX Runtime's CPU provider; export fp32 to serve on CPU"
        )
    print(out)


def measured_error(manifest) -> str:
    """One line: what a reduced-precision build measured against fp32 (bf16: against ONNX Runtime's fp32 on
    the same graphs; int8: the export's int8 graphs against fp32, and the engines against ONNX Runtime's int8)."""
    built = {name: entry["error"] for name, entry in manifest.report.items() if "error" in entry}
    shown = ", ".join(f"{name} {error:.2e}" for name, error in built.items())
    if manifest.export.precision == "bf16":
        return f"bf16 against fp32 (max abs error relative to max(1, |output|), random inputs): {shown}"
    quantized = {n: c.report["int8_error"] for n, c in manifest.export.components.items() if "int8_error" in c.report}
    line = "int8 graphs against fp32 (the export's measure): " + ", ".join(f"{n} {e:.2e}" for n, e in quantized.items())
    return line + (f"; {manifest.backend} against ONNX Runtime's int8 on the same files: {shown}" if built else "")


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

    from ..generate import read_prompts
    from ..pipeline.calibrate import calibrate as run_calibration
    from ..pipeline.calibrate import parse_counts
    from ..request import check_choice, check_number

    counts, ns = parse_counts(steps, "--steps", 2), parse_counts(intervals, "--intervals", 2, "2,3,4,5")
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
