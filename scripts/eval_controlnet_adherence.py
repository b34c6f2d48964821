"""Placement adherence of the shapes ControlNet under DeepCache (issue 33): fresh against reused residuals.

Engines of the shapes model exported with the shapes ControlNet (`init-tiny --preset shapes-controlnet`,
`export --controlnet shapes=...`). For `--count` (caption, box, seed) triples, boxes anywhere in the image
(voltacache.shapes.placement.random_box), each image is generated at N = 1 and, for every other N, with the
ControlNet's residuals reused on shallow steps and run fresh; and once without the ControlNet (the baseline: the
shapes model draws near the center). Adherence is the mean IoU, in points (x100), between the shape each image
shows and the mask asked for. Prints the table, the ControlNet calls, and each contender's distance from N = 1;
writes a JSON with the CPU and, with --figure, a plot.

    python scripts/eval_controlnet_adherence.py --engines build/shapes-cn/engines --count 96 \
        --out build/results/controlnet_adherence.json --figure build/figures/controlnet_adherence.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True, help="shapes engines exported with a ControlNet")
    parser.add_argument("--name", default=None, help="the ControlNet's name (default: the engines' first)")
    parser.add_argument("--count", type=int, default=96, help="(caption, box, seed) triples")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--intervals", default="3,5", help="DeepCache N besides 1")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args()

    from tqdm import tqdm

    from voltacache.benchmark import machine, write_json
    from voltacache.pipeline.stable_diffusion import StableDiffusion
    from voltacache.shapes import dataset, placement

    sd = StableDiffusion.from_engines(args.engines)
    name = args.name or sd.capabilities.controlnets[0]
    size = sd.sizes[0][0]
    rng = np.random.default_rng(0)
    combos = [dataset.TRAIN[i] for i in rng.integers(len(dataset.TRAIN), size=args.count)]
    boxes = [placement.random_box(rng, size) for _ in combos]
    intervals = [int(n) for n in args.intervals.split(",") if n]
    contenders = {"no ControlNet": None, "N=1": (1, "reuse")}
    for n in intervals:
        contenders |= {f"N={n} reused": (n, "reuse"), f"N={n} fresh": (n, "fresh")}

    scores = {label: [] for label in contenders}
    calls = {label: 0 for label in contenders}
    for i, (combo, box) in enumerate(tqdm(list(zip(combos, boxes)), desc="adherence", mininterval=5)):
        control = placement.control_image(combo.shape, box, size)
        mask = placement.mask_of(control)
        for label, setting in contenders.items():
            fields = dict(steps=args.steps, seed=i, scheduler="ddim", cache_mode="off")
            if setting is not None:
                n, residuals = setting
                fields |= dict(controlnets={name: 1.0}, control_images=control, cache_interval=n)
                fields |= dict(control_residuals=residuals)
            result = sd(combo.caption, **fields)
            scores[label].append(placement.iou(placement.drawn_mask(np.asarray(result.images[0])), mask))
            calls[label] += result.stats.controlnet_calls

    table = {
        label: {
            "adherence": 100 * float(np.mean(values)),
            "stderr": 100 * float(np.std(values) / np.sqrt(len(values))),
            "controlnet_calls_per_image": calls[label] / args.count,
        }
        for label, values in scores.items()
    }
    for row in table.values():
        row["points_from_N1"] = row["adherence"] - table["N=1"]["adherence"]
    report = {
        "machine": machine(),
        "engines": str(args.engines),
        "count": args.count,
        "steps": args.steps,
        "table": table,
        "scores": {label: [float(v) for v in values] for label, values in scores.items()},
    }
    print(f"{report['machine']['cpu']}; {args.count} placements, {args.steps} DDIM steps")
    for label, row in table.items():
        print(
            f"  {label:14} IoU {row['adherence']:5.1f} ± {row['stderr']:.1f}  ({row['points_from_N1']:+5.1f} from N=1)"
            f"  {row['controlnet_calls_per_image']:4.1f} ControlNet calls/image"
        )
    write_json(args.out, report)
    if args.figure:
        plot(report, args.figure)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from voltacache.benchmark import save_figure

    table = report["table"]
    fig, ax = plt.subplots(figsize=(7, 3))
    colors = ["#888" if "no" in label else "#2a7" if "reused" in label else "#27a" for label in table]
    ax.bar(
        list(table), [r["adherence"] for r in table.values()], yerr=[r["stderr"] for r in table.values()], color=colors
    )
    ax.set_ylabel("placement IoU (points)")
    ax.set_title(f"shapes ControlNet, {report['count']} placements, {report['machine']['cpu']}", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
