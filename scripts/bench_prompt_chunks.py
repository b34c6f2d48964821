"""Long prompts on static engines: what a dynamic context costs (issue 32).

Two engine folders of the same model: one exported with `--max-prompt-chunks 1` (a static context of 77
tokens, as every export before), one with more (a dynamic context). Side by side in one run, alternating:
seconds per image for a one-chunk prompt on each, and for prompts of 2 and 4 chunks on the dynamic one
(which the static one refuses), with the same seed, steps and DeepCache interval; and one unet_deep call at
each context length. Prints the ratios against the static engines and writes a JSON with the CPU.

    python scripts/bench_prompt_chunks.py --static /work/sd15/ort_fp32 --dynamic /work/sd15/ort_fp32_k4 \
        --out build/results/prompt_chunks.json --figure build/figures/prompt_chunks.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

WORDS = "a red circle on a blue background, a watercolor painting of a lighthouse at dusk, "


def prompt_of(chunks: int, tokenizer) -> str:
    """A prompt that takes exactly `chunks` chunks of 75 tokens."""
    text = WORDS
    while tokenizer.chunks(len(tokenizer.tokens([text])[0])) < chunks:
        text += WORDS
    while tokenizer.chunks(len(tokenizer.tokens([text])[0])) > chunks:
        text = text[: text.rstrip(", ").rfind(" ")]
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--static", type=Path, required=True, help="engines exported with --max-prompt-chunks 1")
    parser.add_argument("--dynamic", type=Path, required=True, help="engines of the same model, more chunks")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=3, help="DeepCache N (1: every step in full)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", default="1,2,4")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args()

    from voltacache.benchmark import alternate, machine, summarize, write_json
    from voltacache.pipeline.stable_diffusion import StableDiffusion, Stats
    from voltacache.request import Request
    from voltacache.specs import UNET_DEEP

    static, dynamic = StableDiffusion.from_engines(args.static), StableDiffusion.from_engines(args.dynamic)
    if static.export.max_prompt_chunks != 1:
        parser.error(f"--static {args.static}: exported with --max-prompt-chunks {static.export.max_prompt_chunks}")
    chunks = [int(k) for k in args.chunks.split(",")]
    prompts = {k: prompt_of(k, dynamic.tokenizers[0]) for k in chunks}
    request = dict(steps=args.steps, seed=1, scheduler="ddim", cache_interval=args.interval, cache_mode="off")

    def image(sd, k):
        return lambda: sd(prompts[k], **request)

    def unet_call(sd, k):
        work = sd.begin(Request(prompts[k], **request), *sd.encode_prompt(Request(prompts[k], **request), Stats()))
        feeds = work.feeds()
        return lambda: sd.runners[UNET_DEEP].infer(feeds)

    images = {"static, 1 chunk": image(static, 1), **{f"dynamic, {k} chunk(s)": image(dynamic, k) for k in chunks}}
    calls = {"static, 1 chunk": unet_call(static, 1)}
    calls |= {f"dynamic, {k} chunk(s)": unet_call(dynamic, k) for k in chunks}
    same = np.array_equal(np.asarray(static(prompts[1], **request).images[0]), dynamic(prompts[1], **request).images[0])
    report = {
        "machine": machine(),
        "static": str(args.static),
        "dynamic": str(args.dynamic),
        "model": dynamic.export.source,
        "size": list(dynamic.export.size),
        "precision": dynamic.export.precision,
        "request": request,
        "one_chunk_images_identical": bool(same),
        "seconds_per_image": summarize(alternate(images, args.repeats), "static, 1 chunk"),
        "unet_deep_call": summarize(alternate(calls, 3 * args.repeats), "static, 1 chunk"),
    }
    print(f"{report['machine']['cpu']}; {report['size']} {report['precision']}, {args.steps} steps, N={args.interval}")
    print(f"one-chunk images identical on static and dynamic engines: {same}")
    for table in ("seconds_per_image", "unet_deep_call"):
        for name, row in report[table].items():
            ratio = 1 / row["speedup_vs_static, 1 chunk"]
            print(f"{table:18} {name:20} {row['median_s']:8.3f} s  x{ratio:.3f} of static")
    write_json(args.out, report)
    if args.figure:
        plot(report, args.figure)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from voltacache.benchmark import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, table, unit in zip(axes, ("seconds_per_image", "unet_deep_call"), ("s/image", "s/call")):
        rows = report[table]
        ax.barh(list(rows), [r["median_s"] for r in rows.values()], color=["#888"] + ["#2a7"] * (len(rows) - 1))
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(table.replace("_", " "))
    fig.suptitle(f"prompt chunks, {report['machine']['cpu']}", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
