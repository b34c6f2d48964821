"""Several image sizes from one engine set: what dynamic height and width cost (issue 32).

One engine folder exported for several sizes (`export --sizes`), and engine folders of the same model exported
for one size each. Side by side in one run, alternating: seconds per image at each size on the multi-size
engines and on that size's own engines, with the same prompt, seed, steps and DeepCache interval; one unet_deep
call likewise; whether the images are identical; and what each export cost (seconds, bytes on disk). Prints
the ratios against the one-size engines and writes a JSON with the CPU.

    python scripts/bench_sizes.py --multi /work/sd15/ort_sizes \
        --single /work/sd15/ort_fp32_k4 --single /work/sd15/ort_fp32_384x256 \
        --out build/results/sizes.json --figure build/figures/sizes.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

PROMPT = "a watercolor painting of a lighthouse at dusk"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multi", type=Path, required=True, help="engines exported with --sizes")
    parser.add_argument("--single", type=Path, action="append", required=True, help="engines of one of its sizes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=3, help="DeepCache N (1: every step in full)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args()

    from voltacache.benchmark import alternate, machine, summarize, write_json
    from voltacache.pipeline.stable_diffusion import StableDiffusion, Stats
    from voltacache.request import Request
    from voltacache.runtime.manifests import read_engine_manifest
    from voltacache.specs import UNET_DEEP

    multi = StableDiffusion.from_engines(args.multi)
    singles = {StableDiffusion.from_engines(folder).sizes[0]: folder for folder in args.single}
    if len(multi.sizes) < 2:
        parser.error(f"--multi {args.multi}: engines of one size; give engines exported with --sizes")
    missing = [f"{w}x{h}" for h, w in singles if (h, w) not in multi.sizes]
    if missing:
        parser.error(f"--single: {', '.join(missing)} is not among --multi's sizes")
    request = dict(steps=args.steps, seed=1, scheduler="ddim", cache_interval=args.interval, cache_mode="off")

    def image(sd, at):
        return lambda: sd(PROMPT, **at)

    def unet_call(sd, size):
        fields = Request(PROMPT, height=size[0], width=size[1], **request)
        feeds = sd.begin(fields, *sd.encode_prompt(fields, Stats())).feeds()
        return lambda: sd.runners[UNET_DEEP].infer(feeds)

    report = {"machine": machine(), "multi": str(args.multi), "request": request, "sizes": {}}
    print(f"{report['machine']['cpu']}; {multi.export.precision}, {args.steps} steps, N={args.interval}")
    for size, folder in singles.items():
        single = StableDiffusion.from_engines(folder)
        name = f"{size[1]}x{size[0]}"
        at = dict(height=size[0], width=size[1], **request)
        images = {"one size": image(single, at), "several sizes": image(multi, at)}
        calls = {"one size": unet_call(single, size), "several sizes": unet_call(multi, size)}
        same = np.array_equal(np.asarray(single(PROMPT, **at).images[0]), np.asarray(multi(PROMPT, **at).images[0]))
        report["sizes"][name] = {
            "single": str(folder),
            "images_identical": bool(same),
            "seconds_per_image": summarize(alternate(images, args.repeats), "one size"),
            "unet_deep_call": summarize(alternate(calls, 3 * args.repeats), "one size"),
        }
        print(f"{name}: images identical: {same}")
        for table in ("seconds_per_image", "unet_deep_call"):
            for contender, row in report["sizes"][name][table].items():
                ratio = 1 / row["speedup_vs_one size"]
                print(f"  {table:18} {contender:14} {row['median_s']:8.3f} s  x{ratio:.3f} of one size")
        del single
    report["exports"] = {
        str(folder): {
            "sizes": [f"{w}x{h}" for h, w in read_engine_manifest(folder).export.image_sizes],
            "export_seconds": read_engine_manifest(folder).export.seconds,
            "engine_bytes": folder_bytes(folder),
        }
        for folder in (args.multi, *args.single)
    }
    for folder, facts in report["exports"].items():
        print(
            f"{folder}: {', '.join(facts['sizes'])}: export {facts['export_seconds']} s, "
            f"engines {facts['engine_bytes'] / 1e9:.2f} GB"
        )
    write_json(args.out, report)
    if args.figure:
        plot(report, args.figure)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from voltacache.benchmark import save_figure

    sizes = report["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, table, unit in zip(axes, ("seconds_per_image", "unet_deep_call"), ("s/image", "s/call")):
        x = np.arange(len(sizes))
        for offset, (contender, color) in zip((-0.2, 0.2), (("one size", "#888"), ("several sizes", "#2a7"))):
            ax.bar(
                x + offset, [s[table][contender]["median_s"] for s in sizes.values()], 0.4, label=contender, color=color
            )
        ax.set_xticks(x, list(sizes))
        ax.set_ylabel(unit)
        ax.set_title(table.replace("_", " "))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"one engine set for several sizes, {report['machine']['cpu']}", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
