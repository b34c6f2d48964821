"""Quality under caching, on the trained shapes model: adherence, and PSNR against the uncached image.

    .venv/bin/python scripts/eval_shapes_quality.py --model build/shapes/model

Every evaluation caption (the trained combinations and the held-out pairs), one image each at a
fixed seed, DDIM 20 steps (--steps), through our engines (fp32 ONNX Runtime) and pipeline:
- uncached (N=1): the reference;
- DeepCache N = 2, 3, 4, 5 on both branches (block and 0), uniform, and for N = 3, 5 also DeepCache's
  non-uniform schedule;
- the same N calibrated (`voltacache calibrate` on 6 trained captions at other seeds, run here first),
  and the adaptive schedule at a range of thresholds: each config's mean full U-Net calls per image
  beside its quality (the Pareto figure);
- the approximate cache at each K it stores (10% to 50% of the steps): the generation starts from a
  neighbour prompt's latent K steps in and runs the remaining steps with its own text embeddings.
  The neighbour is the caption with one word changed (background, color or shape), the kind of
  prompt a cache ranks nearest: exactly what the cache layer does on an approximate hit.
Adherence is the checker's verdict (color, shape and background all right); PSNR is against the
uncached image of the same caption and seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from rich.progress import Progress

from voltacache.bench import engines_for
from voltacache.benchmark import machine, save_figure, write_json
from voltacache.cache.layers import NIRVANA_BANDS, CacheConfig, checkpoint_steps, parse_bands
from voltacache.images import to_uint8
from voltacache.pipeline.calibrate import calibrate
from voltacache.pipeline.stable_diffusion import StableDiffusion, Stats
from voltacache.request import Request
from voltacache.shapes.checker import check, parse_caption
from voltacache.shapes.dataset import COLORS, SHAPES, evaluation_captions

INTERVALS = (2, 3, 4, 5)
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)  # adaptive
CALIBRATION_SEED = 5000  # the evaluation's seeds start at --seed (1000)
BRANCHES = ("block", "0")
NEIGHBOURS = ("background", "color", "shape")


def neighbour(caption: str, field: str) -> str:
    """The caption with one word changed: the next value of `field` that keeps shape color != background."""
    color, shape, background = parse_caption(caption)
    colors = list(COLORS)
    if field == "shape":
        shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
    else:
        current = background if field == "background" else color
        options = [c for c in colors[colors.index(current) + 1 :] + colors if c not in (color, background)]
        background, color = (options[0], color) if field == "background" else (background, options[0])
    return f"a {color} {shape} on a {background} background"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


class Generator:
    """Images from text through the pipeline's own stages, with DeepCache and approximate starts."""

    def __init__(self, sd: StableDiffusion, guidance: float, steps: int):
        self.sd, self.guidance, self.steps = sd, guidance, steps

    def embeddings(self, caption: str):
        return self.sd.encode_prompt(Request(caption), Stats())[0]

    def image(self, caption: str, seed: int, interval=1, start=None, capture=frozenset(), schedule="uniform", **more):
        """(image, captured latents); `self.full_calls` holds the generation's full U-Net calls."""
        request = Request(caption, steps=self.steps, guidance=self.guidance, seed=seed, scheduler="ddim")
        request = request.replace(cache_interval=interval, cache_schedule=schedule, **more)
        stats = Stats()
        latents, _, captured = self.sd.generate_latents(
            self.embeddings(caption), request, stats=stats, start=start, capture=capture
        )
        self.full_calls = stats.unet_deep_calls
        return to_uint8(self.sd.decode_latents(latents, Stats()))[0], captured


def calibration_captions() -> list[str]:
    """6 trained captions, spread over colors, shapes and backgrounds."""
    trained = [caption for caption, held_out in evaluation_captions() if not held_out]
    return trained[:: len(trained) // 6][:6]


def evaluate(args) -> dict:
    engines = {branch: engines_for(args.model, args.workdir, 64, branch) for branch in BRANCHES}
    for folder in engines.values():  # schedules of this step count, measured on other seeds
        calibrate(
            folder, calibration_captions(), (args.steps,), INTERVALS, "ddim", args.guidance, CALIBRATION_SEED, True
        )
    pipelines = {branch: StableDiffusion.from_engines(path) for branch, path in engines.items()}
    generators = {branch: Generator(sd, args.guidance, args.steps) for branch, sd in pipelines.items()}
    # every K NIRVANA stores (10% to 50% of the steps), wider than our default bands ask for
    ks = sorted(checkpoint_steps(args.steps, CacheConfig(bands=parse_bands(NIRVANA_BANDS)))) if args.approximate else []
    captions = evaluation_captions()
    rows = []
    with Progress() as progress:
        task = progress.add_task("captions", total=len(captions))
        for index, (caption, held_out) in enumerate(captions):
            seed = args.seed + index
            gen = generators["block"]
            reference, _ = gen.image(caption, seed)
            row = {"caption": caption, "held_out": held_out, "seed": seed, "configs": {}}

            def score(name, image, reference=reference, row=row, caption=caption, calls=None):
                row["configs"][name] = {
                    "ok": check(image, caption)["all_ok"],
                    "psnr": psnr(image, reference),
                    "full_calls": calls,
                }

            score("uncached", reference)
            for branch in BRANCHES:
                g = generators[branch]
                for n in INTERVALS:
                    score(f"deepcache N={n} {branch}", g.image(caption, seed, n)[0], calls=g.full_calls)
                    if n in (3, 5):  # DeepCache's non-uniform schedule: full steps denser where features move fastest
                        image = g.image(caption, seed, n, schedule="nonuniform")[0]
                        score(f"deepcache N={n} {branch} nonuniform", image, calls=g.full_calls)
                    image = g.image(caption, seed, n, schedule="calibrated")[0]
                    score(f"deepcache N={n} {branch} calibrated", image, calls=g.full_calls)
                for threshold in args.thresholds:
                    image = g.image(caption, seed, schedule="adaptive", refresh_threshold=threshold)[0]
                    score(f"deepcache adaptive {threshold} {branch}", image, calls=g.full_calls)
            for field in NEIGHBOURS if ks else ():
                # the neighbour's generation, as the cache stored it (its latents at every checkpoint)
                _, stored = gen.image(neighbour(caption, field), seed, capture=set(ks))
                for k in ks:
                    score(f"approximate K={k} {field}", gen.image(caption, seed, start=(stored[k], k))[0])
            rows.append(row)
            progress.advance(task)
    return summarize(rows, ks)


def summarize(rows: list[dict], ks: list[int]) -> dict:
    names = list(rows[0]["configs"])
    summary = {}
    for name in names:
        entry = {}
        for group, chosen in (
            ("trained", [r for r in rows if not r["held_out"]]),
            ("held_out", [r for r in rows if r["held_out"]]),
        ):
            entry[f"adherence_{group}"] = float(np.mean([r["configs"][name]["ok"] for r in chosen]))
        finite = [r["configs"][name]["psnr"] for r in rows if np.isfinite(r["configs"][name]["psnr"])]
        entry["psnr_db"] = float(np.mean(finite)) if finite else float("inf")
        entry["adherence_all"] = float(np.mean([r["configs"][name]["ok"] for r in rows]))
        calls = [r["configs"][name].get("full_calls") for r in rows]
        entry["full_calls"] = float(np.mean(calls)) if None not in calls else None
        entry["drop_points"] = 100 * (summary.get("uncached", entry)["adherence_all"] - entry["adherence_all"])
        summary[name] = entry
    return {"ks": ks, "summary": summary, "rows": rows}


def plot(result: dict, path: Path, steps: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, ks = result["summary"], result["ks"]
    panels = 2 if ks else 1  # the approximate cache's panel only when it was measured
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    left = axes[0, 0]
    base = summary["uncached"]["adherence_all"] * 100
    for branch, marker in zip(BRANCHES, ("o", "s")):
        values = [base] + [summary[f"deepcache N={n} {branch}"]["adherence_all"] * 100 for n in INTERVALS]
        left.plot((1, *INTERVALS), values, marker=marker, label=f"branch {branch}")
        nonuniform = [base] + [summary[f"deepcache N={n} {branch} nonuniform"]["adherence_all"] * 100 for n in (3, 5)]
        left.plot((1, 3, 5), nonuniform, marker=marker, linestyle="--", label=f"branch {branch}, non-uniform")
    left.set_xlabel("DeepCache interval N")
    left.set_ylabel("adherence, all captions (%)")
    left.set_title(f"DeepCache, {steps} DDIM steps")
    left.legend()
    if not ks:
        return save_figure(fig, path)
    right = axes[0, 1]
    for field in NEIGHBOURS:
        right.plot(
            ks,
            [summary[f"approximate K={k} {field}"]["adherence_all"] * 100 for k in ks],
            marker="o",
            label=f"neighbour: {field} changed",
        )
    right.axhline(base, color="gray", linestyle="--", label="uncached")
    right.set_xlabel(f"K: steps taken from the neighbour (of {steps})")
    right.set_title("approximate cache")
    right.legend()
    return save_figure(fig, path)


def plot_pareto(result: dict, path: Path, steps: int, thresholds) -> Path:
    """Full U-Net calls per image against adherence lost, per branch and schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, axes = plt.subplots(1, len(BRANCHES), figsize=(5.5 * len(BRANCHES), 4), sharey=True)
    series = {
        "uniform": [f"deepcache N={n} {{b}}" for n in INTERVALS],
        "non-uniform (DeepCache)": [f"deepcache N={n} {{b}} nonuniform" for n in (3, 5)],
        "calibrated": [f"deepcache N={n} {{b}} calibrated" for n in INTERVALS],
        "adaptive": [f"deepcache adaptive {t} {{b}}" for t in thresholds],
    }
    for ax, branch in zip(axes, BRANCHES):
        for (label, names), marker in zip(series.items(), "osD^"):
            points = sorted(
                (summary[n.format(b=branch)]["full_calls"], summary[n.format(b=branch)]["drop_points"]) for n in names
            )
            ax.plot(*zip(*points), marker=marker, label=label)
        ax.axhline(0, color="gray", linestyle="--")
        ax.set_xlabel(f"full U-Net calls per image (of {steps} steps)")
        ax.set_title(f"branch {branch}, {steps} DDIM steps")
    axes[0].set_ylabel("adherence lost against uncached (points)")
    axes[0].legend()
    return save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", type=Path, required=True, help="the shapes model (voltacache init-tiny DIR --preset shapes)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("build/shapes-eval"))
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument(
        "--no-approximate",
        dest="approximate",
        action="store_false",
        help="DeepCache only (for a longer schedule, such as DeepCache's own 50 steps, in a third of the time)",
    )
    parser.add_argument("--out", type=Path, default=Path("build/results/shapes_quality.json"))
    parser.add_argument("--figure", type=Path, default=Path("build/figures/shapes_quality.png"))
    parser.add_argument(
        "--thresholds",
        type=lambda text: tuple(float(t) for t in text.split(",")),
        default=THRESHOLDS,
        help="adaptive refresh thresholds (the same threshold refreshes about as often at any step count)",
    )
    parser.add_argument("--pareto", type=Path, default=Path("build/figures/shapes_schedules_pareto.png"))
    args = parser.parse_args()
    started = time.perf_counter()
    result = evaluate(args)
    figure = plot(result, args.figure, args.steps)
    pareto = plot_pareto(result, args.pareto, args.steps, args.thresholds)
    config = {k: str(v) for k, v in vars(args).items()}
    write_json(args.out, {"machine": machine(), "config": config, "seconds": time.perf_counter() - started, **result})
    print_summary(result["summary"])
    print(f"figures: {figure} {pareto}\nresults: {args.out}")


def print_summary(summary: dict) -> None:
    width = max(map(len, summary)) + 2
    print(f"{'config':<{width}} {'trained':>8} {'held-out':>9} {'all':>6} {'drop':>6} {'PSNR dB':>8} {'full':>6}")
    for name, s in summary.items():
        print(
            f"{name:<{width}} {s['adherence_trained']:8.1%} {s['adherence_held_out']:9.1%} {s['adherence_all']:6.1%} "
            f"{s['drop_points']:6.1f} {s['psnr_db']:8.1f} {s['full_calls'] or 0:6.2f}"
        )


if __name__ == "__main__":
    main()
