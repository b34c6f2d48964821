"""ControlNet over prebuilt engines against diffusers' ControlNet pipeline (issue 33), side by side in one run.

Contenders, alternating, the same prompt, control image, seed and steps: diffusers' StableDiffusionControlNetPipeline
(fp32, the reference), DeepCache's helper on it (DeepCacheSDHelper, N and branch 0, where it runs), voltacache at
N = 1 and at N with the ControlNet's residuals reused on shallow steps and run fresh. Then what the residual
inputs cost a request without ControlNet: the same uncontrolled request on the engines exported with ControlNets
(zero residuals) and on engines of the same model exported without (`--plain`), per image and per unet_deep call.
Prints seconds per image, speedups over diffusers and the ControlNet's share of voltacache's time; writes a JSON
with the CPU and a figure.

    python scripts/bench_controlnet.py --model /work/sd15/model --controlnet /work/sd15/cnet \
        --engines /work/sd15/ort_cn --plain /work/sd15/ort_fp32 \
        --out build/results/controlnet.json --figure build/figures/controlnet.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

PROMPT = "a watercolor painting of a lighthouse at dusk"


def control_image(size: int) -> np.ndarray:
    """Canny edges of a drawn scene: what a Canny ControlNet is given."""
    from PIL import Image, ImageDraw

    from voltacache.images import canny

    photo = Image.new("RGB", (size, size), (40, 60, 90))
    draw = ImageDraw.Draw(photo)
    draw.rectangle([size // 3, size // 4, size // 2, size - 10], fill=(220, 220, 210))
    draw.ellipse([size // 2, size // 8, size - 20, size // 2], fill=(240, 200, 60))
    return canny(np.asarray(photo))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the diffusers folder the engines were exported from")
    parser.add_argument("--controlnet", type=Path, required=True, help="the ControlNet folder exported with them")
    parser.add_argument("--engines", type=Path, required=True, help="engines exported with --controlnet")
    parser.add_argument("--name", default=None, help="the ControlNet's name in --engines (default: its first)")
    parser.add_argument("--plain", type=Path, help="engines of the same model exported without ControlNets")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=3, help="DeepCache N")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args()

    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    from voltacache.benchmark import alternate, machine, summarize, write_json
    from voltacache.compile.checkpoint import load_pipeline
    from voltacache.pipeline.stable_diffusion import StableDiffusion, Stats
    from voltacache.request import Request
    from voltacache.schedulers import make_scheduler
    from voltacache.specs import UNET_DEEP

    ours = StableDiffusion.from_engines(args.engines)
    name = args.name or ours.capabilities.controlnets[0]
    height, width = ours.sizes[0]
    control = control_image(width)
    base = load_pipeline(args.model)
    pipe = StableDiffusionControlNetPipeline(
        **{**base.components, "scheduler": make_scheduler("ddim", dict(base.scheduler.config))},
        controlnet=ControlNetModel.from_pretrained(args.controlnet, torch_dtype=torch.float32),
    )
    pipe.set_progress_bar_config(disable=True)
    request = dict(steps=args.steps, seed=1, scheduler="ddim", cache_mode="off")
    controlled = dict(request, controlnets={name: 1.0}, control_images=control)

    def theirs():
        generator = torch.Generator().manual_seed(1)
        image = Image.fromarray(control)
        return pipe(
            PROMPT, image=image, num_inference_steps=args.steps, generator=generator, height=height, width=width
        )

    def voltacache(**fields):
        return lambda: ours(PROMPT, **controlled, **fields)

    n = args.interval
    contenders = {"diffusers ControlNet": theirs}
    helper = deepcache_helper(pipe, n)
    if helper is not None:
        contenders[f"DeepCache helper N={n}"] = lambda: helper(theirs)
    contenders |= {
        "voltacache N=1": voltacache(),
        f"voltacache N={n} reused": voltacache(cache_interval=n, control_residuals="reuse"),
        f"voltacache N={n} fresh": voltacache(cache_interval=n, control_residuals="fresh"),
    }
    report = {"machine": machine(), "engines": str(args.engines), "request": request, "interval": n}
    print(f"{report['machine']['cpu']}; {ours.export.precision} {width}x{height}, {args.steps} DDIM steps, N={n}")
    report["seconds_per_image"] = summarize(alternate(contenders, args.repeats), "diffusers ControlNet")
    for contender, row in report["seconds_per_image"].items():
        print(f"  {contender:26} {row['median_s']:8.2f} s/image  x{row['speedup_vs_diffusers ControlNet']:.2f}")

    shares = {}
    for label, fields in (
        ("N=1", {}),
        (f"N={n} reused", {"cache_interval": n}),
        (f"N={n} fresh", {"cache_interval": n, "control_residuals": "fresh"}),
    ):
        result = ours(PROMPT, **controlled, **fields)
        seconds = result.stats.seconds
        shares[label] = {
            "controlnet_calls": result.stats.controlnet_calls,
            "controlnet_s": sum(v for k, v in seconds.items() if k.startswith("controlnet_")),
            "total_s": result.seconds,
        }
        share = shares[label]["controlnet_s"] / result.seconds
        print(f"  ControlNet's share at {label}: {share:.1%} ({result.stats.controlnet_calls} calls)")
    report["controlnet_share"] = shares

    if args.plain:  # the residual inputs' cost to a request without ControlNet
        plain = StableDiffusion.from_engines(args.plain)

        def unet_call(sd):
            fields = Request(PROMPT, **request)
            feeds = sd.begin(fields, *sd.encode_prompt(fields, Stats())).feeds()
            return lambda: sd.runners[UNET_DEEP].infer(feeds)

        uncontrolled = {
            "engines without ControlNet": lambda: plain(PROMPT, **request),
            "with, zero residuals": lambda: ours(PROMPT, **request),
        }
        calls = {"engines without ControlNet": unet_call(plain), "with, zero residuals": unet_call(ours)}
        same = np.asarray(plain(PROMPT, **request).images[0], int) - np.asarray(ours(PROMPT, **request).images[0], int)
        report["uncontrolled"] = {
            "plain": str(args.plain),
            "max_level_difference": int(np.abs(same).max()),
            "seconds_per_image": summarize(alternate(uncontrolled, args.repeats), "engines without ControlNet"),
            "unet_deep_call": summarize(alternate(calls, 5 * args.repeats), "engines without ControlNet"),
        }
        print(
            f"uncontrolled requests (images differ by at most {report['uncontrolled']['max_level_difference']} levels):"
        )
        for table in ("seconds_per_image", "unet_deep_call"):
            for contender, row in report["uncontrolled"][table].items():
                ratio = 1 / row["speedup_vs_engines without ControlNet"]
                print(f"  {table:18} {contender:28} {row['median_s']:8.3f} s  x{ratio:.3f}")
    write_json(args.out, report)
    if args.figure:
        plot(report, args.figure)


def deepcache_helper(pipe, interval: int):
    """A function running `fn` with DeepCache's helper enabled on the ControlNet pipeline, or None where the
    helper is not installed or does not run on it (said on stdout)."""
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        print("DeepCache is not installed (pip install -e '.[bench]'): its helper is left out")
        return None
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)

    def run(fn):
        helper.enable()
        try:
            return fn()
        finally:
            helper.disable()

    try:
        from PIL import Image

        probe = Image.new("RGB", (64, 64))
        run(lambda: pipe("probe", image=probe, num_inference_steps=2, height=64, width=64))
    except Exception as e:  # noqa: BLE001 -- whatever the helper raises on a ControlNet pipeline is the finding
        print(f"DeepCache's helper does not run on the ControlNet pipeline: {type(e).__name__}: {e}")
        return None
    return run


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from voltacache.benchmark import save_figure

    rows = report["seconds_per_image"]
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    colors = ["#888" if not name.startswith("voltacache") else "#2a7" for name in rows]
    ax.barh(list(rows), [r["median_s"] for r in rows.values()], color=colors)
    for i, r in enumerate(rows.values()):
        ax.text(r["median_s"], i, f" {r['speedup_vs_diffusers ControlNet']:.2f}x", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per image")
    ax.set_title(f"ControlNet, SD 1.5 architecture, {report['machine']['cpu']}", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
