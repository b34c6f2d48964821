"""LoRA switching on built engines, measured side by side in one run (docs/benchmarks.md, "LoRA").

For engines of the SD 1.5 architecture (random weights, `voltacache init-tiny --preset sd15`): a LoRA of
rank R on the attention, feed-forward and projection layers of the U-Net and the text encoder (as a
trainer writes one) is applied without rebuilding. Reported: the switch (the LoRA's changes from
diffusers + PEFT, the replaced initializers, the new sessions), the first request after a switch
against a base request, a request on a resident variant, switching back to a resident variant, and
what a LoRA-scoped cache entry costs against a base one (lookup and store, milvus-lite).

    python scripts/bench_lora.py --model build/sd15/model --engines build/lora/sd15_engines
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import write_lora  # noqa: E402  (the LoRA files the tests use, at a trainer's rank)

from voltacache.benchmark import machine
from voltacache.compile.checkpoint import load_pipeline
from voltacache.pipeline.lora import LoraFile
from voltacache.pipeline.stable_diffusion import StableDiffusion

PROMPT = "a watercolor painting of a lighthouse at dusk"


def timed(call):
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("build/results/lora_switching.json"))
    parser.add_argument("--figure", type=Path, default=Path("build/figures/lora_switching_sd15.png"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    pipe = load_pipeline(args.model)
    files = {
        name: LoraFile.open(name, write_lora(pipe, work / f"{name}.safetensors", seed=seed, rank=args.rank, std=0.02))
        for seed, name in enumerate(("first", "second"))
    }
    del pipe
    sd = StableDiffusion.from_engines(args.engines, loras=files, resident=1)
    request = dict(steps=args.steps, seed=1, scheduler="ddim", cache_mode="off")
    first, second = (("first", 0.8),), (("second", 0.8),)

    rows = {}
    print("warming up, then 7 requests and 2 switches (SD 1.5 on a CPU: minutes)", file=sys.stderr)
    sd(PROMPT, **request)  # warm-up: the sessions' first run
    rows["base request"] = timed(lambda: sd(PROMPT, **request))[1]
    rows["first request after a switch"] = timed(lambda: sd(PROMPT, loras=first, **request))[1]
    rows["switch (changes + sessions)"] = sd.loras.last_switch_seconds
    rows["request on the resident variant"] = timed(lambda: sd(PROMPT, loras=first, **request))[1]
    rows["base request, variant resident"] = timed(lambda: sd(PROMPT, **request))[1]
    sd.loras.changes.clear()  # a LoRA not seen before: read and merged again
    rows["first request after a switch to another LoRA"] = timed(lambda: sd(PROMPT, loras=second, **request))[1]
    rows["switch to another LoRA"] = sd.loras.last_switch_seconds
    _, changes_seconds = timed(lambda: sd.loras._changes("first", 0.5))
    rows["of which: the LoRA's changes (diffusers + PEFT)"] = changes_seconds
    components = [n for n in sd.loras.targets if n in sd.runners]
    rows["new sessions of the base engines (for comparison)"] = timed(
        lambda: [sd.runners[n].with_initializers({}) for n in components]
    )[1]

    cache_rows = cache_costs(sd, work, request)
    size = sum(f.path.stat().st_size for f in files.values()) / len(files) / 2**20
    report = {
        "engines": str(args.engines),
        "rank": args.rank,
        "lora_file_mib": round(size, 1),
        "steps": args.steps,
        "seconds": {k: round(v, 3) for k, v in rows.items()},
        "cache": cache_rows,
        "ratios": {
            "first request after a switch / base request": round(
                rows["first request after a switch"] / rows["base request"], 2
            ),
            "request on the resident variant / base request": round(
                rows["request on the resident variant"] / rows["base request"], 2
            ),
        },
    }
    report = {"machine": machine(), **report}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    plot(report, args.figure)


def plot(report: dict, path: Path) -> None:
    """Seconds per request: base, after a switch (the switch's share marked), on a resident variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["seconds"]
    labels = ["base", "first after\na switch", "first after a switch\nto another LoRA", "resident\nvariant"]
    totals = [
        s["base request"],
        s["first request after a switch"],
        s["first request after a switch to another LoRA"],
        s["request on the resident variant"],
    ]
    switches = [0, s["switch (changes + sessions)"], s["switch to another LoRA"], 0]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(labels, [t - w for t, w in zip(totals, switches)], color="#4c72b0", label="denoising and decoding")
    ax.bar(labels, switches, bottom=[t - w for t, w in zip(totals, switches)], color="#dd8452", label="the switch")
    ax.set_ylabel("seconds per request")
    ax.set_title(f"LoRA on built SD 1.5 engines (ONNX Runtime, 2 CPU cores, {report['steps']} steps, 256 px)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def cache_costs(sd, work: Path, request: dict) -> dict:
    """A cache entry of a LoRA request against a base one: the same layers, a scope with the LoRA in it."""
    from voltacache.cache.layers import CacheSettings, open_cache

    settings = CacheSettings(index=str(work / "cache.db"), embedder="minilm")
    cache = open_cache(settings, sd.export.fingerprint, sd.export.geometry.pooled_dim)
    costs = {}
    request = {**request, "cache_mode": "on"}
    for label, loras in (("base", ()), ("lora", (("first", 0.8),))):
        stored = sd(PROMPT, cache=cache, loras=loras, **request)
        hits = [  # near-repeats of the stored prompt: semantic hits; the median of 5 (one can stall on I/O)
            timed(lambda n=n, loras=loras: sd(PROMPT + "." * n, cache=cache, loras=loras, **request))
            for n in range(1, 6)
        ]
        seconds = sorted(s for _, s in hits)[len(hits) // 2]
        costs[label] = {"stored": stored.cache, "hit": hits[0][0].cache, "hit_seconds": round(seconds, 4)}
    return costs


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot"]:  # redraw the figure from a results file
        plot(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
    else:
        main()
