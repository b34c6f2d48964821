"""What was tried for issue 19 and not kept, measured on the trained shapes model (block split, DDIM):

1. A calibrated schedule from the measured change alone. For every pair of steps i < j, the guided
   output at step j on step i's deep feature is compared with its own (relative L1, uncached
   trajectories of the calibration captions). A dynamic program then places the refreshes to
   minimize the summed error, each step weighted by (sigma_j - sigma_j+1)^p, its share of the
   denoised estimate. Shipped instead: a search on the final latents (voltacache.pipeline.calibration).
2. Scale-shift alignment (Wimbauer et al.): a per-channel scale and shift of the cached feature
   for each shallow step, fitted by least squares on the calibration trajectories (uncached,
   feature of the last refresh -> feature of the step).
3. The adaptive rule with the guided output as its indicator, instead of the latents that
   voltacache.pipeline.deepcache.AdaptiveSchedule reads.

    .venv/bin/python scripts/eval_schedule_variants.py --model build/shapes/model

Adherence over the 168 evaluation captions (seeds from 1000), PSNR against uncached; the
calibration captions and seeds are those of scripts/eval_shapes_quality.py.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from eval_shapes_quality import CALIBRATION_SEED, calibration_captions, psnr

from voltacache.bench import engines_for
from voltacache.benchmark import machine, write_json
from voltacache.images import to_uint8
from voltacache.pipeline import stable_diffusion as P
from voltacache.pipeline.deepcache import FixedSchedule, relative_change, uniform_steps
from voltacache.pipeline.stable_diffusion import StableDiffusion, Stats, guided
from voltacache.request import Request
from voltacache.schedulers import make_scheduler
from voltacache.shapes.checker import check
from voltacache.shapes.dataset import evaluation_captions
from voltacache.specs import DEEP_FEATURE, NOISE_PRED, UNET_DEEP, UNET_SHALLOW


def trajectories(sd, steps, guidance):
    """The calibration captions uncached: per caption, every step's feeds, guided output and deep feature."""
    runs = []
    for k, caption in enumerate(calibration_captions()):
        request = Request(caption, steps=steps, guidance=guidance, seed=CALIBRATION_SEED + k, scheduler="ddim")
        work = sd.begin(request, *sd.encode_prompt(request, Stats()))
        run = {"feeds": [], "outputs": [], "features": [], "timesteps": [float(t) for t in work.timesteps]}
        while not work.done:
            feeds = work.feeds()
            out = sd.runners[UNET_DEEP].infer(feeds)
            run["feeds"].append(feeds)
            run["outputs"].append(guided(out[NOISE_PRED], guidance))
            run["features"].append(out[DEEP_FEATURE])
            work.advance(out[NOISE_PRED], out[DEEP_FEATURE])
        runs.append(run)
    return runs


def output_errors(sd, runs, guidance) -> np.ndarray:
    """error[i, j]: step j's guided output on step i's feature against its own, averaged over the runs."""
    n = len(runs[0]["feeds"])
    error = np.zeros((n, n))
    for run in runs:
        for j in range(1, n):
            for i in range(j):
                out = sd.runners[UNET_SHALLOW].infer({**run["feeds"][j], DEEP_FEATURE: run["features"][i]})
                error[i, j] += relative_change(guided(out[NOISE_PRED], guidance), run["outputs"][j]) / len(runs)
    return error


def cheapest_refreshes(cost: np.ndarray, calls: int) -> list[int]:
    """The `calls` refresh steps (0 among them) minimizing the summed cost[last refresh, step]: exact DP."""
    steps = len(cost)
    run = np.full((steps, steps + 1), np.inf)
    for i in range(steps):
        run[i, i + 1 :] = np.cumsum(cost[i, i:])
    best = np.full((calls + 1, steps + 1), np.inf)
    start = np.zeros((calls + 1, steps + 1), dtype=int)
    best[1, 1:] = run[0, 1:]
    for m in range(2, calls + 1):
        for e in range(m, steps + 1):
            totals = best[m - 1, m - 1 : e] + run[m - 1 : e, e]
            start[m, e] = m - 1 + int(np.argmin(totals))
            best[m, e] = totals[start[m, e] - (m - 1)]
    chosen, end = [], steps
    for m in range(calls, 1, -1):
        end = int(start[m, end])
        chosen.append(end)
    return [0, *sorted(chosen)]


def scale_shift(runs, refresh) -> dict:
    """Per shallow step: per-channel (scale, shift) taking the last refresh's feature to the step's own."""
    params, last = {}, 0
    for j in range(len(runs[0]["features"])):
        if j in refresh:
            last = j
            continue
        x = np.concatenate([r["features"][last] for r in runs]).transpose(1, 0, 2, 3)
        y = np.concatenate([r["features"][j] for r in runs]).transpose(1, 0, 2, 3)
        x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
        dx, dy = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
        scale = (dx * dy).sum(1) / np.maximum((dx * dx).sum(1), 1e-12)
        shift = y.mean(1) - scale * x.mean(1)
        params[j] = (scale.reshape(1, -1, 1, 1).astype(np.float32), shift.reshape(1, -1, 1, 1).astype(np.float32))
    return params


class OutputIndicator:
    """The adaptive rule on the guided output's change, read after each step (it decides the next)."""

    def __init__(self, threshold):
        self.threshold, self.accumulated, self.previous, self.next = threshold, 0.0, None, True

    def due(self, index, latents):
        return self.next

    def observe(self, output):
        if self.previous is not None:
            self.accumulated += relative_change(output, self.previous)
        self.previous, self.next = output, False
        if self.accumulated >= self.threshold:
            self.accumulated, self.next = 0.0, True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("build/shapes-eval"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("build/results/shapes_schedule_variants.json"))
    args = parser.parse_args()
    sd = StableDiffusion.from_engines(engines_for(args.model, args.workdir, 64, "block"))
    runs = trajectories(sd, args.steps, args.guidance)
    align = {}  # the scale and shift applied to the cached feature, per shallow step (empty: none)
    feeds, advance = P.Work.feeds, P.Work.advance

    def aligned_feeds(work):
        out = feeds(work)
        if DEEP_FEATURE in out and work.index in align:
            scale, shift = align[work.index]
            out = {**out, DEEP_FEATURE: scale * out[DEEP_FEATURE] + shift}
        return out

    def observed_advance(work, noise_pred, deep_feature=None):
        if isinstance(work.schedule, OutputIndicator):
            work.schedule.observe(guided(noise_pred, work.request.guidance))
        advance(work, noise_pred, deep_feature)

    P.Work.feeds, P.Work.advance = aligned_feeds, observed_advance
    captions, references, results = evaluation_captions(), {}, {}

    def evaluate(name, schedule):
        ok, quality, calls = [], [], []
        for i, (caption, _) in enumerate(captions):
            request = Request(caption, steps=args.steps, guidance=args.guidance, seed=1000 + i, scheduler="ddim")
            work = sd.begin(request.replace(cache_mode="off"), *sd.encode_prompt(request, Stats()))
            work.schedule = schedule()
            sd.run(work)
            image = to_uint8(sd.decode_latents(work.latents, Stats()))[0]
            references.setdefault(i, image)
            ok.append(check(image, caption)["all_ok"])
            quality.append(psnr(image, references[i]))
            calls.append(work.stats.unet_deep_calls)
        finite = [q for q in quality if math.isfinite(q)]
        results[name] = {
            "adherence": float(np.mean(ok)),
            "psnr_db": float(np.mean(finite)) if finite else None,
            "full_calls": float(np.mean(calls)),
        }
        drop = 100 * (results["uncached"]["adherence"] - results[name]["adherence"])
        print(f"{name:<48} calls {np.mean(calls):5.2f}  adherence {np.mean(ok):6.1%}  drop {drop:5.1f}", flush=True)

    evaluate("uncached", lambda: FixedSchedule(range(args.steps)))
    error = output_errors(sd, runs, args.guidance)
    scheduler = make_scheduler("ddim", sd.scheduler_config, args.steps)
    alphas = scheduler.alphas_cumprod.numpy()
    sigmas = np.array([math.sqrt((1 - alphas[int(t)]) / alphas[int(t)]) for t in runs[0]["timesteps"]] + [0.0])
    weights = sigmas[:-1] - sigmas[1:]
    for n in (3, 5):
        uniform = uniform_steps(args.steps, n)
        evaluate(f"uniform N={n}", lambda u=uniform: FixedSchedule(u))
        for p in (0.0, 1.0):
            chosen = cheapest_refreshes(error * weights[None, :] ** p, len(uniform))
            evaluate(f"output-error DP p={p:g} N={n} {chosen}", lambda c=chosen: FixedSchedule(c))
        align.update(scale_shift(runs, set(uniform)))
        evaluate(f"uniform N={n} + scale-shift", lambda u=uniform: FixedSchedule(u))
        align.clear()
    for threshold in (0.1, 0.15, 0.2):
        evaluate(f"adaptive, output indicator {threshold}", lambda t=threshold: OutputIndicator(t))
    write_json(args.out, {"machine": machine(), "config": {k: str(v) for k, v in vars(args).items()}, **results})
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
