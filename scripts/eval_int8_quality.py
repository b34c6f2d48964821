"""Quality of the CPU engines' reduced precisions on the trained shapes model: the gate before one is offered.

For each of the 168 evaluation captions (144 trained, 24 held-out pairs) at the headline setting
(DDIM 20 steps, guidance 5, seed 1000 + caption index): adherence (scripts/eval_shapes_quality.py's
checker) and PSNR against ONNX Runtime's fp32 uncached image, for every backend and precision that runs
here (ONNX Runtime fp32 and int8; OpenVINO f32, bf16 and int8 from the same exports), uncached and with
DeepCache N=3 on both branches. OpenVINO's int8 is also compared with ONNX Runtime's int8 (the same QDQ
file, other kernels). The int8 U-Nets are calibrated on the default calibration set
(voltacache.compile.options.DEFAULT_PROMPTS: general prompts, three of them shapes captions).

    python scripts/eval_int8_quality.py --model build/shapes/model
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from eval_shapes_quality import BRANCHES, Generator, evaluation_captions, print_summary, psnr, summarize
from rich.progress import Progress

from voltacache.bench import engines_for
from voltacache.benchmark import machine, write_json
from voltacache.compile.options import Calibration
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.runtime.backends import BACKENDS
from voltacache.runtime.cpu import has_bf16
from voltacache.shapes.checker import check

# (label, backend, export precision); the first is the reference every image is compared with
CONFIGS = (
    ("fp32", "onnxruntime", "fp32"),
    ("int8", "onnxruntime", "int8"),
    ("ov f32", "openvino", "fp32"),
    ("ov bf16", "openvino", "bf16"),
    ("ov int8", "openvino", "int8"),
)


def runnable(backends: list[str]) -> list[tuple[str, str, str]]:
    chosen = [c for c in CONFIGS if c[1] in backends and BACKENDS[c[1]].available()[0]]
    return [c for c in chosen if c[2] != "bf16" or has_bf16()]


def evaluate(args) -> dict:
    configs = runnable(args.backends.split(","))

    def pipeline(backend, precision, branch):
        calibration = Calibration() if precision == "int8" else None
        engines = engines_for(args.model, args.workdir, 64, branch, precision, calibration, backend)
        return StableDiffusion.from_engines(engines)

    generators = {
        (label, branch): Generator(pipeline(backend, precision, branch), args.guidance, args.steps)
        for label, backend, precision in configs
        for branch in BRANCHES
    }
    captions = evaluation_captions()
    rows = []
    with Progress() as progress:
        task = progress.add_task("captions", total=len(captions))
        for index, (caption, held_out) in enumerate(captions):
            seed = args.seed + index
            row = {"caption": caption, "held_out": held_out, "seed": seed, "configs": {}}
            images = {}
            for label, _, _ in configs:
                images[label] = generators[(label, "block")].image(caption, seed)[0]
                for branch in BRANCHES:
                    images[f"{label} N={args.interval} {branch}"] = generators[(label, branch)].image(
                        caption, seed, args.interval
                    )[0]
            reference = images[configs[0][0]]
            for name, image in images.items():
                name = "uncached" if name == configs[0][0] else name  # summarize's reference row
                row["configs"][name] = {"ok": check(image, caption)["all_ok"], "psnr": psnr(image, reference)}
            if "int8" in images and "ov int8" in images:
                row["ov_int8_vs_int8_psnr"] = psnr(images["ov int8"], images["int8"])
            rows.append(row)
            progress.advance(task)
    result = summarize(rows, [])
    between = [r["ov_int8_vs_int8_psnr"] for r in rows if "ov_int8_vs_int8_psnr" in r]
    if between:
        result["ov_int8_vs_int8_psnr_db"] = sum(between) / len(between)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the shapes model (init-tiny DIR --preset shapes)")
    parser.add_argument("--workdir", type=Path, default=Path("build/shapes-eval"))
    parser.add_argument("--backends", default="onnxruntime,openvino", help="comma-separated (default: both)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("build/results/shapes_quality_int8.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    result = evaluate(args)
    config = {k: str(v) for k, v in vars(args).items()}
    calibration = Calibration().to_json()
    write_json(
        args.out,
        {"machine": machine(), "config": config, "calibration": calibration, "seconds": time.perf_counter() - started}
        | result,
    )
    print_summary(result["summary"])
    if "ov_int8_vs_int8_psnr_db" in result:
        print(f"OpenVINO int8 against ONNX Runtime int8: {result['ov_int8_vs_int8_psnr_db']:.1f} dB")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
