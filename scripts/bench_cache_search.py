"""The cache's search API through Triton: latency at 10k and 100k stored entries, and how often the
recommendations for a paraphrase include the prompt it paraphrases.

    .venv/bin/python scripts/bench_cache_search.py --engines engines/demo --entries 10000 100000

For each size: a fresh milvus-lite index (the sentence embedder, as a deployment with
`--cache-embedder minilm` keeps it) holding the workload's prompts of scripts/bench_cache_workload.py
(embedded for real) and filler entries up to N (random unit vectors, the same model), each with a
64x64 image; then `voltacache deploy` with that cache, a tritonserver, and timed calls of
Client.search (top 9, thumbnails of 128 px: the page's gallery) and Client.recommend (top 5) from
one client, one at a time. Recall: for each paraphrase of a stored prompt (subject first, medium
after, styles reversed: the workload's own rewording), whether the top 5 recommendations hold it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_cache_workload import SUBJECTS, Workload, canonical
from rich.progress import track

from voltacache.benchmark import free_port, machine, write_json
from voltacache.cache.embedders import MiniLMEmbedder
from voltacache.cache.layers import CacheSettings, to_bytes
from voltacache.cache.store import CacheStore, scope_key
from voltacache.serving.client import Client
from voltacache.serving.deploy import deploy
from voltacache.serving.server import TritonServer

BATCH = 2000
TOP_SEARCH, TOP_RECOMMEND = 9, 5


def workload_prompts(count: int, seed: int) -> list[tuple[str, str]]:
    """(stored prompt, its paraphrase) for `count` new prompts of the cache benchmark's workload."""
    workload = Workload(seed)
    pairs = []
    while len(pairs) < count:
        medium = workload.pick(workload.phrases["mediums"])
        subject = workload.pick(SUBJECTS)
        styles = [workload.pick(workload.phrases["styles"]) for _ in range(3)]
        pairs.append((canonical(medium, subject, styles), f"{subject}, {medium}, " + ", ".join(styles[::-1])))
    return pairs


def fill(store: CacheStore, fingerprint: str, prompts: list[str], vectors: np.ndarray, entries: int, rng) -> None:
    images = [to_bytes(np.full((1, 64, 64, 3), i, np.uint8)) for i in range(64)]
    scope = scope_key(fingerprint, steps=20)
    filler = rng.standard_normal((entries - len(prompts), vectors.shape[1])).astype(np.float32)
    filler /= np.linalg.norm(filler, axis=1, keepdims=True)
    rows = [(p, v) for p, v in zip(prompts, vectors)] + [(f"filler prompt {i}", v) for i, v in enumerate(filler)]
    for start in track(range(0, len(rows), BATCH), description=f"storing {entries} entries"):
        store.put_many(
            [
                dict(
                    vector=v,
                    scope=scope,
                    kind="image",
                    payload=images[(start + i) % 64],
                    seed=start + i,
                    step=20,
                    model=fingerprint,
                    prompt=p,
                    params={"steps": 20, "height": 64, "width": 64},
                )
                for i, (p, v) in enumerate(rows[start : start + BATCH])
            ]
        )
    store.client.flush(store.collection)


def timed(call, queries) -> np.ndarray:
    seconds = []
    for query in queries:
        started = time.perf_counter()
        call(query)
        seconds.append(time.perf_counter() - started)
    return np.array(seconds) * 1000


def measure(engines: Path, entries: int, pairs, vectors, calls: int, rng) -> dict:
    fingerprint = json.loads((engines / "engines.json").read_text())["export"]["fingerprint"]
    with tempfile.TemporaryDirectory() as tmp:
        settings = CacheSettings(index=str(Path(tmp) / "cache.db"), embedder="minilm")
        with CacheStore(settings.index, Path(tmp) / "cache-blobs", dim=MiniLMEmbedder.dim, embedder="minilm") as store:
            fill(store, fingerprint, [p for p, _ in pairs], vectors, entries, rng)
        repo = deploy(engines, Path(tmp) / "repo", cache=settings)
        ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        with TritonServer(repo, **ports, log_file=Path(tmp) / "tritonserver.log") as server:
            client = Client(server.grpc_url)
            client.search("warm up", top=TOP_SEARCH, thumbnail=128)
            stored = [p for p, _ in pairs]
            picks = [pairs[int(i)][1] for i in rng.integers(0, len(pairs), calls)]
            search_ms = timed(lambda q: client.search(q, top=TOP_SEARCH, thumbnail=128), picks)
            partial = [" ".join(q.split()[: max(2, len(q.split()) // 2)]) for q in picks]  # half typed
            recommend_ms = timed(lambda q: client.recommend(q, TOP_RECOMMEND), partial)
            found = [
                stored[i] in {f.prompt for f in client.recommend(paraphrase, TOP_RECOMMEND)}
                for i, (_, paraphrase) in enumerate(track(pairs, description="paraphrase recall"))
            ]
            first = [client.recommend(paraphrase, 1)[0].prompt == stored[i] for i, (_, paraphrase) in enumerate(pairs)]
    row = {"entries": entries, "calls": calls}
    for name, ms in (("search", search_ms), ("recommend", recommend_ms)):
        row |= {f"{name}_p50_ms": float(np.percentile(ms, 50)), f"{name}_p99_ms": float(np.percentile(ms, 99))}
    return row | {"paraphrase_in_top5": float(np.mean(found)), "paraphrase_first": float(np.mean(first))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--prompts", type=int, default=500, help="workload prompts stored (and paraphrased)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("build/results/cache_search.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pairs = workload_prompts(args.prompts, seed=0)
    embedder = MiniLMEmbedder()
    vectors = np.stack([embedder.embed(p) for p, _ in track(pairs, description="embedding the workload")])
    rows = [measure(args.engines, n, pairs, vectors, args.calls, rng) for n in args.entries]
    for row in rows:
        print(
            f"{row['entries']:>7} entries: search p50 {row['search_p50_ms']:.1f} ms p99 {row['search_p99_ms']:.1f} ms; "
            f"recommend p50 {row['recommend_p50_ms']:.1f} ms p99 {row['recommend_p99_ms']:.1f} ms; "
            f"paraphrase in top 5 {row['paraphrase_in_top5']:.1%}, first {row['paraphrase_first']:.1%}"
        )
    write_json(args.out, {"machine": machine(), "prompts": args.prompts, "rows": rows})


if __name__ == "__main__":
    main()
