"""Quality of the int8 U-Nets on the trained shapes model, through our engines.

For each of the 168 evaluation captions (144 trained, 24 held-out pairs) at the headline setting
(DDIM 20 steps, guidance 5, seed 1000 + caption index): adherence (scripts/eval_shapes_quality.py's
checker) and PSNR against the fp32 uncached image, for fp32 and int8 without DeepCache and with
DeepCache N=3 on both branches. The int8 U-Nets are calibrated on the default calibration set
(voltacache.compile.options.DEFAULT_PROMPTS: general prompts, three of them shapes captions).

    python scripts/eval_int8_quality.py --model build/demo/model
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
from voltacache.shapes.checker import check

PRECISIONS = ("fp32", "int8")


def evaluate(args) -> dict:
    def pipeline(precision, branch):
        calibration = Calibration() if precision == "int8" else None
        return StableDiffusion.from_engines(engines_for(args.model, args.workdir, 64, branch, precision, calibration))

    generators = {
        (precision, branch): Generator(pipeline(precision, branch), args.guidance, args.steps)
        for precision in PRECISIONS
        for branch in BRANCHES
    }
    captions = evaluation_captions()
    rows = []
    with Progress() as progress:
        task = progress.add_task("captions", total=len(captions))
        for index, (caption, held_out) in enumerate(captions):
            seed = args.seed + index
            reference, _ = generators[("fp32", "block")].image(caption, seed)
            row = {"caption": caption, "held_out": held_out, "seed": seed, "configs": {}}

            def score(name, image, reference=reference, row=row, caption=caption):
                row["configs"][name] = {"ok": check(image, caption)["all_ok"], "psnr": psnr(image, reference)}

            score("uncached", reference)  # fp32, N=1: the reference every other image is compared with
            score("int8", generators[("int8", "block")].image(caption, seed)[0])
            for precision in PRECISIONS:
                for branch in BRANCHES:
                    image = generators[(precision, branch)].image(caption, seed, args.interval)[0]
                    score(f"{precision} N={args.interval} {branch}", image)
            rows.append(row)
            progress.advance(task)
    return summarize(rows, [])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the shapes model (init-tiny DIR --preset shapes)")
    parser.add_argument("--workdir", type=Path, default=Path("build/shapes-eval"))
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
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
