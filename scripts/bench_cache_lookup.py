"""Cache hit latency against the number of stored entries (issue 6's 10k / 100k figure).

    .venv/bin/python scripts/bench_cache_lookup.py --entries 10000 100000 --lookups 300

For each size: a fresh milvus-lite index (the embedded default) and local blob store, N entries of
384-d unit vectors (MiniLM's width) spread over 8 scopes, inserted in batches; then timed semantic
lookups of stored vectors plus a little noise, each one the whole hit path: a filtered vector
search, the blob read and its sha256 check, and the hit count update.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from voltacache.benchmark import machine, write_json
from voltacache.cache.layers import RequestCache, to_bytes
from voltacache.cache.store import CacheStore

DIM, SCOPES, BATCH = 384, 8, 2000


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def measure(entries: int, lookups: int, rng: np.random.Generator) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = CacheStore(str(Path(tmp) / "index.db"), Path(tmp) / "blobs", dim=DIM, embedder="bench")
        vectors = unit(rng.standard_normal((entries, DIM)).astype(np.float32))
        scopes = [f"scope-{i % SCOPES}" for i in range(entries)]
        images = [to_bytes(np.full((1, 64, 64, 3), i, np.uint8)) for i in range(256)]  # a 64x64 image each
        started = time.perf_counter()
        for start in range(0, entries, BATCH):
            store.put_many(
                [
                    dict(vector=vectors[i], scope=scopes[i], kind="image", payload=images[i % 256])
                    for i in range(start, min(start + BATCH, entries))
                ]
            )
        insert_s = time.perf_counter() - started
        cache = RequestCache(store, embedder=None, fingerprint="bench")
        picks = rng.integers(0, entries, lookups)
        seconds, hits = [], 0
        for i in picks:
            query = unit((vectors[i] + 0.01 * rng.standard_normal(DIM).astype(np.float32))[None])[0]
            started = time.perf_counter()
            decision = cache.lookup(query, scopes[i], steps=20, seed=None)
            seconds.append(time.perf_counter() - started)
            hits += decision.layer == "semantic"
    ms = np.array(seconds) * 1000
    return {
        "entries": entries,
        "insert_rows_per_s": entries / insert_s,
        "lookups": lookups,
        "hit_rate": hits / lookups,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--lookups", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("build/results/cache_lookup.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = [measure(n, args.lookups, rng) for n in args.entries]
    for row in rows:
        print(
            f"{row['entries']:>7} entries: insert {row['insert_rows_per_s']:7.0f} rows/s, hit rate "
            f"{row['hit_rate']:.2f}, hit latency p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms"
        )
    write_json(args.out, {"machine": machine(), "dim": DIM, "scopes": SCOPES, "rows": rows})


if __name__ == "__main__":
    main()
