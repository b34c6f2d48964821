"""Triton end to end against the in-process pipeline on the same engines: the serving overhead per image.

    .venv/bin/python scripts/bench_serving.py --engines engines/demo --steps 20 --repeats 7

Both contenders run the same request (prompt, seed, steps, scheduler, DeepCache interval); the
served one goes client -> gRPC -> ensemble (tokenizer, text_encoder, BLS denoiser, vae_decoder,
postprocess) -> client. A fresh seed per round keeps Triton's response cache out of the timing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

from voltacache.benchmark import alternate, free_port, machine, summarize, write_json
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.serving.client import Client
from voltacache.serving.deploy import deploy
from voltacache.serving.server import TritonServer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache-interval", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("build/results/serving.json"))
    args = parser.parse_args()

    request = dict(steps=args.steps, scheduler="ddim", cache_interval=args.cache_interval)
    prompt = "a photo of an astronaut riding a horse"
    local = StableDiffusion.from_engines(args.engines)
    seeds = itertools.count(1000)
    with tempfile.TemporaryDirectory() as tmp:
        repo = deploy(args.engines, Path(tmp) / "repo")
        with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
            client = Client(server.grpc_url)
            seconds = alternate(
                {
                    "in_process": lambda: local(prompt, seed=next(seeds), **request),
                    "triton_grpc": lambda: client.generate(prompt, seed=next(seeds), **request),
                },
                repeats=args.repeats,
            )
    summary = summarize(seconds, "in_process")
    overhead = summary["in_process"]["median_s"] and (
        summary["triton_grpc"]["median_s"] / summary["in_process"]["median_s"] - 1
    )
    result = {
        "engines": str(args.engines),
        "request": request,
        "machine": machine(),
        "results": summary,
        "triton_overhead": overhead,
    }
    write_json(args.out, result)
    for name, row in summary.items():
        print(f"{name:>12}: median {row['median_s'] * 1000:8.1f} ms  ({len(row['runs_s'])} runs)")
    print(f"Triton overhead: {overhead * 100:+.1f}% per image  -> {args.out}")
    print(json.dumps({"triton_overhead": overhead}))


if __name__ == "__main__":
    main()
