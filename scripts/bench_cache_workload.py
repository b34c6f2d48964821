"""Cross-request caching on a prompt workload: hit rate per layer, U-Net calls saved, latency vs no cache.

    .venv/bin/python scripts/bench_cache_workload.py --engines build/bench/tiny/engines_block_64 --requests 240

The workload (seeded, described in docs/benchmarks.md): prompts composed from the phrase lists that
clip-interrogator ships (mediums, movements, flavors, artists) around a list of subjects, as
"{medium} of {subject}, {style}, {style}, {style}". Each request of the stream is one of
- new: a prompt not seen before;
- repeat: an earlier prompt again, word for word (popular prompts more often: Zipf);
- paraphrase: an earlier prompt reworded: subject first, medium after, styles reordered;
- variation: an earlier prompt with one style phrase swapped for another.
Requests carry no seed, as a user who wants "an image of this" does.

Every request runs twice, cache off and cache on (a fresh milvus-lite index, the MiniLM embedder),
the order alternating, so that machine noise falls on both alike. The ratios printed are of the two
in this one run. With --sd15-results, each cache-on request's measured cache overhead is added to
the SD 1.5 component times measured by `voltacache bench` (a projection: the tiny model's steps
cost milliseconds, SD 1.5's seconds, and the cache's cost does not depend on the model).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rich.progress import Progress

from voltacache.benchmark import machine, save_figure, write_json
from voltacache.cache.layers import open_request_cache
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.specs import TEXT_ENCODER, UNET_DEEP, UNET_SHALLOW, VAE_DECODER

SUBJECTS = [
    "a lighthouse on a cliff",
    "an old fisherman mending nets",
    "a fox in a snowy forest",
    "a city street at night in the rain",
    "a castle above the clouds",
    "a bowl of ripe peaches",
    "a robot reading a book",
    "a sailing ship in a storm",
    "a mountain lake at sunrise",
    "a cat sleeping on a windowsill",
    "an astronaut riding a horse",
    "a desert caravan at dusk",
    "a cottage in a field of sunflowers",
    "a dragon curled around a tower",
    "a jazz band in a smoky club",
    "a samurai under cherry blossoms",
    "a steam train crossing a bridge",
    "a portrait of a young queen",
    "a coral reef full of fish",
    "a market square in winter",
    "a wolf howling at the moon",
    "a library with endless shelves",
    "a hot air balloon over hills",
    "a greenhouse full of orchids",
]
MIX = {"new": 0.40, "repeat": 0.25, "paraphrase": 0.20, "variation": 0.15}
NIRVANA = {"compute_saved": 0.21, "latency_reduction": 0.198}


def interrogator_phrases() -> dict[str, list[str]]:
    """clip-interrogator's phrase lists, read from its package data without importing it (its import
    loads open_clip and BLIP)."""
    spec = importlib.util.find_spec("clip_interrogator")
    if spec is None:
        raise SystemExit("clip-interrogator is not installed: `make bench` installs it (pip --no-deps)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    read = lambda name: [line.strip() for line in (data / f"{name}.txt").read_text().splitlines() if line.strip()]  # noqa: E731
    flavors = [
        f for f in read("flavors") if 1 <= len(f.split()) <= 3 and f.isascii() and not any(c.isdigit() for c in f)
    ]
    return {"mediums": read("mediums"), "styles": read("movements") + flavors + [f"by {a}" for a in read("artists")]}


class Workload:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.phrases = interrogator_phrases()
        self.seen: list[tuple[str, str, list[str]]] = []  # (medium, subject, styles) of each new prompt

    def pick(self, items):
        return items[int(self.rng.integers(len(items)))]

    def earlier(self):
        # popular prompts come back more often: Zipf over the order of first appearance
        rank = min(int(self.rng.zipf(1.5)) - 1, len(self.seen) - 1)
        return self.seen[len(self.seen) - 1 - rank] if self.rng.random() < 0.5 else self.seen[rank]

    def request(self) -> tuple[str, str]:
        kind = "new" if not self.seen else str(self.rng.choice(list(MIX), p=list(MIX.values())))
        if kind == "new":
            parts = (
                self.pick(self.phrases["mediums"]),
                self.pick(SUBJECTS),
                [self.pick(self.phrases["styles"]) for _ in range(3)],
            )
            self.seen.append(parts)
            return kind, canonical(*parts)
        medium, subject, styles = self.earlier()
        if kind == "repeat":
            return kind, canonical(medium, subject, styles)
        if kind == "paraphrase":
            return kind, f"{subject}, {medium}, " + ", ".join(styles[::-1])
        swapped = list(styles)
        swapped[int(self.rng.integers(len(swapped)))] = self.pick(self.phrases["styles"])
        return kind, canonical(medium, subject, swapped)


def canonical(medium: str, subject: str, styles: list[str]) -> str:
    return f"{medium} of {subject}, " + ", ".join(styles)


def run_request(sd, cache, prompt: str, mode: str, steps: int) -> dict:
    result = sd(prompt, steps=steps, scheduler="ddim", guidance=7.5, seed=None, cache=cache, cache_mode=mode)
    stats = result.stats
    return {
        "seconds": result.seconds,
        "layer": result.cache,
        "similarity": result.similarity,
        "steps": stats.steps,
        "unet_calls": stats.unet_deep_calls + stats.unet_shallow_calls,
        "unet_deep_calls": stats.unet_deep_calls,
        "unet_shallow_calls": stats.unet_shallow_calls,
        "text_encoder_calls": int(TEXT_ENCODER in stats.seconds),
        "decoded": int(VAE_DECODER in stats.seconds),
        "component_seconds": dict(stats.seconds),
    }


def sd15_projection(rows: list[dict], sd15_results: Path) -> dict:
    """Per-call SD 1.5 times (256x256, ONNX Runtime on this CPU) plus each request's measured cache overhead."""
    bench = json.loads(sd15_results.read_text())
    per_call = {}
    for row in bench["rows"]:
        if row["kind"] == "voltacache" and row["branch"] == "block" and row["interval"] in (1, 3):
            seconds = row["component_seconds"]
            per_call.setdefault(UNET_DEEP, seconds[UNET_DEEP] / row["unet_deep_calls"])
            per_call.setdefault(VAE_DECODER, seconds[VAE_DECODER])
            if row["unet_shallow_calls"]:
                per_call[UNET_SHALLOW] = seconds[UNET_SHALLOW] / row["unet_shallow_calls"]

    def projected(run: dict, overhead: float) -> float:
        return (
            overhead
            + run["unet_deep_calls"] * per_call[UNET_DEEP]
            + run["unet_shallow_calls"] * per_call.get(UNET_SHALLOW, per_call[UNET_DEEP])
            + run["decoded"] * per_call[VAE_DECODER]
        )

    off = [projected(r["off"], 0.0) for r in rows]
    # the cache's own cost: everything the cache-on run spent outside the model's components
    on = [projected(r["on"], r["on"]["seconds"] - sum(r["on"]["component_seconds"].values())) for r in rows]
    return {
        "per_call_s": per_call,
        "mean_off_s": float(np.mean(off)),
        "mean_on_s": float(np.mean(on)),
        "latency_reduction": 1 - float(np.mean(on)) / float(np.mean(off)),
    }


def summarize(rows: list[dict], steps: int) -> dict:
    on = [r["on"] for r in rows]
    off = [r["off"] for r in rows]
    layers = Counter(r["layer"] for r in on)
    by_kind = {}
    for kind in MIX:
        chosen = [r["on"] for r in rows if r["kind"] == kind]
        by_kind[kind] = {
            "requests": len(chosen),
            **{layer: sum(r["layer"] == layer for r in chosen) for layer in layers},
        }
    hits = [r["seconds"] for r in on if r["layer"] == "semantic"]
    return {
        "requests": len(rows),
        "steps": steps,
        "layers": dict(layers),
        "hit_rate": {layer: layers[layer] / len(rows) for layer in ("semantic", "approximate", "miss")},
        "by_kind": by_kind,
        "unet_calls_saved": 1 - sum(r["unet_calls"] for r in on) / sum(r["unet_calls"] for r in off),
        "steps_saved": 1 - sum(r["steps"] for r in on) / sum(r["steps"] for r in off),
        "decodes_saved": 1 - sum(r["decoded"] for r in on) / sum(r["decoded"] for r in off),
        "mean_off_s": float(np.mean([r["seconds"] for r in off])),
        "mean_on_s": float(np.mean([r["seconds"] for r in on])),
        "latency_reduction": 1 - np.mean([r["seconds"] for r in on]) / np.mean([r["seconds"] for r in off]),
        "semantic_hit_p50_ms": float(np.percentile(hits, 50) * 1000) if hits else None,
        "semantic_hit_p99_ms": float(np.percentile(hits, 99) * 1000) if hits else None,
        "cache_overhead_mean_ms": float(
            np.mean([r["seconds"] - sum(r["component_seconds"].values()) for r in on])
            - np.mean([r["seconds"] - sum(r["component_seconds"].values()) for r in off])
        )
        * 1000,
    }


def plot(rows: list[dict], summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    layers, bottom = ("semantic", "approximate", "miss"), np.zeros(len(MIX))
    for layer, color in zip(layers, ("tab:green", "tab:orange", "tab:gray")):
        shares = np.array(
            [summary["by_kind"][k].get(layer, 0) / max(summary["by_kind"][k]["requests"], 1) for k in MIX]
        )
        left.bar(list(MIX), shares, bottom=bottom, label=layer, color=color)
        bottom += shares
    left.set_ylabel("share of requests")
    left.set_title("cache layer by request kind")
    left.legend()
    for mode, color in (("off", "tab:gray"), ("on", "tab:blue")):
        seconds = np.sort([r[mode]["seconds"] for r in rows]) * 1000
        right.plot(seconds, np.arange(1, len(seconds) + 1) / len(seconds), label=f"cache {mode}", color=color)
    right.set_xlabel("latency per request (ms)")
    right.set_ylabel("fraction of requests")
    right.set_title(f"latency, {summary['steps']} DDIM steps")
    right.legend()
    return save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--steps", type=int, default=50, help="50: NIRVANA's setting")
    parser.add_argument("--embedder", default="minilm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sd15-results", type=Path, default=Path("docs/results/bench_sd15.json"))
    parser.add_argument("--out", type=Path, default=Path("build/results/cache_workload.json"))
    parser.add_argument("--figure", type=Path, default=Path("build/figures/cache_workload.png"))
    args = parser.parse_args()

    sd = StableDiffusion.from_engines(args.engines)
    workload = Workload(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Progress() as progress:
        pooled_dim = sd.export.geometry.pooled_dim
        cache = open_request_cache(str(Path(tmp) / "cache.db"), None, args.embedder, sd.export.fingerprint, pooled_dim)
        sd("warm-up", steps=args.steps, scheduler="ddim", cache_mode="off")
        task = progress.add_task("requests (cache off and on)", total=args.requests)
        for i in range(args.requests):
            kind, prompt = workload.request()
            order = ("off", "on") if i % 2 == 0 else ("on", "off")
            runs = {mode: run_request(sd, cache, prompt, mode, args.steps) for mode in order}
            rows.append({"kind": kind, "prompt": prompt, **runs})
            progress.advance(task)
    summary = summarize(rows, args.steps)
    if args.sd15_results.exists():
        summary["sd15_projection"] = sd15_projection(rows, args.sd15_results)
    figure = plot(rows, summary, args.figure)
    write_json(
        args.out, {"machine": machine(), "config": vars(args), "nirvana": NIRVANA, "summary": summary, "rows": rows}
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "by_kind"}, indent=2, default=float))
    print(f"by kind: {json.dumps(summary['by_kind'])}\nfigure: {figure}\nresults: {args.out}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s")
