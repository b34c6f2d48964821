"""CPU engines at the machine's limit, side by side in one run (issue 31): each engine folder given
(any backend and precision: ONNX Runtime fp32 and int8, OpenVINO f32, bf16 and int8) timed the same way,
with PyTorch's diffusers and DeepCache's helper beside them when a model is given.

1. Per call: `unet_deep`, `unet_shallow`, `vae_decoder` (one image: the guidance pair), median seconds;
   the GEMM floor of each precision (a 2048^3 MatMul in the backend at that precision) and the share of it
   the U-Net reaches (its FLOPs counted from the ONNX graph, scripts/unet_flops.py).
2. Per image: 20 DDIM steps at guidance 7.5, N = 1 and N = 3 (DeepCache), median seconds; the VAE's share.
3. The first image of a process: loading the engines and the first image, against the next image.

Engine folders are loaded one at a time (an SD 1.5 engine set holds gigabytes), each timed in alternation
within itself; the CPU model and its matrix flags are written with the result.

    python scripts/bench_cpu_engines.py --engines ort-fp32=build/sd15/engines_fp32 \\
        --engines ov-bf16=build/sd15/engines_bf16 --model build/sd15/model --out build/bench/cpu.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from voltacache.benchmark import machine, write_json  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse, highly detailed"
GEMM = 2048


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(statistics.median(times))


def engine_set(label: str, folder: Path, steps: int, repeats: int) -> dict:
    """Everything measured of one engine folder, loaded once (after its first-image cost is taken)."""
    from voltacache.compile.export import random_inputs
    from voltacache.pipeline.stable_diffusion import StableDiffusion
    from voltacache.runtime.manifests import read_engine_manifest
    from voltacache.specs import TIMESTEP, UNET_DEEP, UNET_SHALLOW, VAE_DECODER

    manifest = read_engine_manifest(folder)
    started = time.perf_counter()
    sd = StableDiffusion.from_engines(folder)
    loaded = time.perf_counter() - started
    request = dict(steps=steps, guidance=7.5, scheduler="ddim", seed=0)
    started = time.perf_counter()
    sd(PROMPT, **request)
    first = time.perf_counter() - started
    rng = np.random.default_rng(0)
    calls = {}
    deep_feature = None
    for name in (UNET_DEEP, UNET_SHALLOW, VAE_DECODER):
        runner = sd.runners[name]
        spec = runner.spec.for_images(1)
        feeds = random_inputs(spec, manifest.export.geometry, rng)
        if TIMESTEP in feeds:
            feeds[TIMESTEP] = np.full(feeds[TIMESTEP].shape, 500.0, np.float32)
        if name == UNET_SHALLOW:
            feeds["deep_feature"] = deep_feature
        out = runner.infer(feeds)
        deep_feature = out.get("deep_feature", deep_feature)
        calls[name] = median_seconds(lambda r=runner, f=feeds: r.infer(f), repeats)
    images = {}
    for n in (1, 3):
        times, vae = [], []
        for k in range(repeats):
            result = sd(PROMPT, **{**request, "seed": k}, cache_interval=n)
            times.append(result.seconds)
            vae.append(result.stats.seconds[VAE_DECODER])
        images[f"N={n}"] = {
            "seconds": statistics.median(times),
            "vae_share": statistics.median(vae) / statistics.median(times),
        }
    next_image = images["N=1"]["seconds"]
    del sd
    gc.collect()
    return {
        "label": label,
        "backend": manifest.backend,
        "precision": manifest.export.precision,
        "inference_precision": manifest.inference_precision,
        "branch": manifest.export.deepcache_branch,
        "size": [manifest.export.height, manifest.export.width],
        "build_error": manifest.report,
        "seconds_per_call": calls,
        "seconds_per_image": images,
        "first_image": {
            "load_s": loaded,
            "first_image_s": first,
            "next_image_s": next_image,
            "extra_s": loaded + first - next_image,
        },
    }


def gemm_rates(repeats: int, n: int = GEMM) -> dict:
    """Giga-ops per second of an n^3 MatMul with constant weights: ONNX Runtime fp32 and int8
    (MatMulInteger, VNNI/AMX where the CPU has them), OpenVINO f32 and bf16."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def model(op, a_type, weights, out):
        a = helper.make_tensor_value_info("a", a_type, [n, n])
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["y"])],
            op,
            [a],
            [helper.make_tensor_value_info("y", out, [n, n])],
            [numpy_helper.from_array(weights, "b")],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)

    rng = np.random.default_rng(0)
    fp32 = model("MatMul", TensorProto.FLOAT, rng.standard_normal((n, n)).astype(np.float32), TensorProto.FLOAT)
    int8 = model("MatMulInteger", TensorProto.UINT8, rng.integers(-127, 127, (n, n), dtype=np.int8), TensorProto.INT32)
    a32, a8 = rng.standard_normal((n, n)).astype(np.float32), rng.integers(0, 255, (n, n), dtype=np.uint8)
    rates = {}
    for name, graph, feeds in (("onnxruntime fp32", fp32, {"a": a32}), ("onnxruntime int8", int8, {"a": a8})):
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        rates[name] = 2 * n**3 / median_seconds(lambda s=session, f=feeds: s.run(None, f), repeats) / 1e9
    try:
        import openvino as ov

        core = ov.Core()
        for precision in ("f32", "bf16"):
            compiled = core.compile_model(
                core.read_model(fp32.SerializeToString(), b""), "CPU", {"INFERENCE_PRECISION_HINT": precision}
            )
            request = compiled.create_infer_request()
            rates[f"openvino {precision}"] = (
                2 * n**3 / median_seconds(lambda r=request: r.infer({"a": a32}), repeats) / 1e9
            )
    except ImportError:
        pass
    return rates


def floor_of(engine: dict) -> str:
    """Which GEMM rate is the U-Net's floor. OpenVINO's int8 is set against the int8 MatMulInteger rate
    (VNNI/AMX): the int8 matrix units' floor, whichever backend drives them."""
    if engine["precision"] == "int8":
        return "onnxruntime int8"
    return f"{engine['backend']} {engine['inference_precision'] or engine['precision']}"  # OpenVINO's f32, bf16


def unet_giga_ops(folder: Path) -> float | None:
    """FLOPs of one unet_deep call (one image: the guidance pair) of the export the engines came from."""
    import onnx
    from unet_flops import macs

    from voltacache.runtime.manifests import read_engine_manifest

    manifest = read_engine_manifest(folder)
    source = Path(manifest.onnx_dir) / manifest.export.components["unet_deep"].file
    if not source.is_file():
        return None
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(source), load_external_data=False))
    return 2 * sum(macs(graph, batch=2).values()) / 1e9  # one image: the guidance pair


def pytorch_baselines(model: Path, size: int, steps: int, repeats: int) -> dict:
    """diffusers' own pipeline, and DeepCache's helper at N = 3 on branch 0 (its anchor)."""
    import torch
    from diffusers import DDIMScheduler

    from voltacache.compile.checkpoint import load_pipeline

    pipe = load_pipeline(model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size)

    def image(seed):
        return pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **call)

    out = {"diffusers": median_seconds(lambda: image(0), repeats)}
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        return out
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    out["deepcache N=3 branch 0"] = median_seconds(lambda: image(0), repeats)
    helper.disable()
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {
        f"{e['label']} N={n}": e["seconds_per_image"][f"N={n}"]["seconds"] for e in result["engines"] for n in (1, 3)
    }
    bars |= result.get("pytorch", {})
    names = sorted(bars, key=bars.get)
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1.5))
    ax.barh(names, [bars[n] for n in names], color=["#4c72b0" if "N=" in n else "#999999" for n in names])
    ax.set_xlabel("seconds per image (lower is faster)")
    m = result["machine"]
    flags = ", ".join(m.get("cpu_flags", []))
    ax.set_title(f"{result['steps']} DDIM steps, {m['cpu']}, {m['cores']} cores\n{flags}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", action="append", required=True, help="LABEL=FOLDER, an engines folder")
    parser.add_argument("--model", type=Path, help="the checkpoint: adds diffusers and DeepCache's helper")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gemm-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True, help="the JSON result")
    parser.add_argument("--figure", type=Path, help="a PNG of seconds per image")
    args = parser.parse_args()
    folders = [item.split("=", 1) for item in args.engines]
    result = {"machine": machine(), "steps": args.steps, "engines": []}
    for label, folder in folders:
        print(f"{label}: {folder}", file=sys.stderr, flush=True)
        measured = engine_set(label, Path(folder), args.steps, args.repeats)
        giga = unet_giga_ops(Path(folder))
        if giga:
            measured["unet_deep_gops"] = giga
            measured["unet_deep_gops_per_s"] = giga / measured["seconds_per_call"]["unet_deep"]
        result["engines"].append(measured)
        write_json(args.out, result)  # kept as it grows: an interrupted run keeps what it measured
    result["gemm_gops_per_s"] = gemm_rates(args.gemm_repeats)
    for measured in result["engines"]:
        floor, rate = floor_of(measured), measured.get("unet_deep_gops_per_s")
        known = rate and floor in result["gemm_gops_per_s"]
        measured["floor"] = floor
        measured["unet_floor_share"] = rate / result["gemm_gops_per_s"][floor] if known else None
    if args.model:
        size = result["engines"][0]["size"][0]
        result["pytorch"] = pytorch_baselines(args.model, size, args.steps, args.repeats)
    write_json(args.out, result)
    if args.figure:
        plot(result, args.figure)
    for e in result["engines"]:
        per = e["seconds_per_image"]
        print(
            f"{e['label']:>14}: unet_deep {e['seconds_per_call']['unet_deep']:.3f} s/call, "
            f"N=1 {per['N=1']['seconds']:.2f} s, N=3 {per['N=3']['seconds']:.2f} s "
            f"(VAE {per['N=3']['vae_share']:.0%}), U-Net at {e['unet_floor_share'] or 0:.0%} of its GEMM floor, "
            f"first image +{e['first_image']['extra_s']:.2f} s"
        )
    print(json_line(result.get("pytorch", {})), json_line(result["gemm_gops_per_s"]))


def json_line(data: dict) -> str:
    return ", ".join(f"{k}: {v:.3g}" for k, v in data.items())


if __name__ == "__main__":
    main()
