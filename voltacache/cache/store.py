"""The cache store: a pymilvus index of prompt embeddings over a blob store, with TTL and eviction.

The same code reaches a milvus-lite file (`./cache.db`, embedded, the default) or a Milvus server
(`http://host:19530`) through `MilvusClient`. Every entry carries the model fingerprint and a key
of the generation parameters; a search only ever sees entries of its own scope, unexpired.

Crash consistency: the blob is written (atomically) before the index row, and a row is only
served if its blob exists and matches its key. A crash between the two leaves an orphan blob,
which `purge` removes; it never leaves a row pointing at a torn blob.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from .blobs import CorruptBlob, open_blob_store
from .policies import POLICIES, victims

COLLECTION_PREFIX = "voltacache_"
NO_SEED = -1
FLUSH_ROWS = 1000
QUERY_PAGE = 1000
# milvus-lite has no MVCC timestamp to give the iterator, which then warns on every scan
logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
LOW_WATER = 0.95  # eviction brings the cache down to this share of its capacity
FIELDS = [
    "id",
    "scope",
    "seed",
    "kind",
    "step",
    "blob",
    "size_bytes",
    "created",
    "expires",
    "hits",
    "last_access",
    "benefit",
]


@dataclass
class Hit:
    id: str
    similarity: float
    entry: dict


def scope_key(fingerprint: str, **params) -> str:
    """Model fingerprint and generation parameters, hashed: entries match only within one scope."""
    text = fingerprint + "|" + "|".join(f"{k}={params[k]!r}" for k in sorted(params))
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def low_water(capacity: int | None) -> int | None:
    return None if capacity is None else capacity - int(capacity * (1 - LOW_WATER))


class CacheStore:
    def __init__(
        self,
        index_uri: str,
        blobs: str | Path,
        dim: int,
        ttl_s: float = 7 * 24 * 3600,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        policy: str = "lcbfu",
        seed: int | None = None,
        clock=time.time,
        embedder: str = "clip",
    ):
        from pymilvus import MilvusClient

        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.uri = str(index_uri)
        if "://" not in self.uri:
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        self.client = MilvusClient(self.uri)
        # one collection per embedder (their vectors are not comparable), each with its own blobs
        self.collection = f"{COLLECTION_PREFIX}{embedder}_{dim}"
        blobs = str(blobs)
        self.blobs = open_blob_store(f"{blobs.rstrip('/')}/{self.collection}")
        self.dim, self.ttl_s, self.policy = dim, ttl_s, policy
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.rng, self.clock = random.Random(seed), clock
        self.evictions = 0
        self.bytes_written = 0
        self.unflushed = 0
        self.bytes_at_scan, self.bytes_written_at_scan = None, 0
        self._ensure_collection()

    def _ensure_collection(self):
        from pymilvus import DataType, MilvusClient

        if self.client.has_collection(self.collection):
            # a file a killed process left behind reopens released: searching it needs a load
            self.client.load_collection(self.collection)
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("scope", DataType.VARCHAR, max_length=64)
        schema.add_field("kind", DataType.VARCHAR, max_length=16)
        schema.add_field("blob", DataType.VARCHAR, max_length=64)
        for name in ("seed", "step", "size_bytes", "hits"):
            schema.add_field(name, DataType.INT64)
        for name in ("created", "expires", "last_access", "benefit"):
            schema.add_field(name, DataType.DOUBLE)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="COSINE")
        self.client.create_collection(self.collection, schema=schema, index_params=index, consistency_level="Strong")

    # -- writing -----------------------------------------------------------------------------

    def put(
        self, vector, scope: str, kind: str, payload: bytes, seed: int = NO_SEED, step: int = 0, benefit: float = 0.0
    ) -> str:
        """Store a payload under an embedding; blob first, index row second. Returns the entry id."""
        return self.put_many(
            [dict(vector=vector, scope=scope, kind=kind, payload=payload, seed=seed, step=step, benefit=benefit)]
        )[0]

    def put_many(self, items: list[dict]) -> list[str]:
        """`put` for many entries: every blob first, then the index rows in one upsert."""
        now, rows = self.clock(), []
        for item in items:
            payload, seed, step = item["payload"], int(item.get("seed", NO_SEED)), int(item.get("step", 0))
            blob = self.blobs.put(payload)
            self.bytes_written += len(payload)
            vector = [float(x) for x in item["vector"]]
            # the same content under the same embedding and scope is one entry (a re-put refreshes it)
            key = f"{item['scope']}|{item['kind']}|{step}|{seed}|{blob}|{vector}"
            entry_id = hashlib.sha256(key.encode()).hexdigest()[:40]
            rows.append(
                {
                    "id": entry_id,
                    "vector": vector,
                    "scope": item["scope"],
                    "kind": item["kind"],
                    "blob": blob,
                    "seed": seed,
                    "step": step,
                    "size_bytes": len(payload),
                    "hits": 0,
                    "created": now,
                    "expires": now + self.ttl_s,
                    "last_access": now,
                    "benefit": float(item.get("benefit", 0.0)),
                }
            )
        self.client.upsert(self.collection, rows)
        self.unflushed += len(rows)
        if self.unflushed >= FLUSH_ROWS:
            # searches scan unsealed rows slowly (milvus-lite: 2.3 s at 10k rows, 30 ms once flushed)
            self.client.flush(self.collection)
            self.unflushed = 0
        self.enforce_capacity()
        return [row["id"] for row in rows]

    def touch(self, hit: Hit) -> None:
        """Count a hit (frequency and recency feed LFU, LRU and LCBFU)."""
        rows = self.client.get(self.collection, ids=[hit.id], output_fields=["*"])
        if rows:
            row = dict(rows[0])
            row["hits"], row["last_access"] = int(row["hits"]) + 1, self.clock()
            self.client.upsert(self.collection, [row])

    # -- reading -----------------------------------------------------------------------------

    def search(self, vector, scope: str, kind: str, seed: int | None = None, limit: int = 4) -> list[Hit]:
        """Nearest unexpired entries of this scope and kind; a request with a seed sees only its seed."""
        expr = f'scope == "{scope}" and kind == "{kind}" and expires > {self.clock()!r}'
        if seed is not None:
            expr += f" and seed == {int(seed)}"
        result = self.client.search(
            self.collection, data=[[float(x) for x in vector]], limit=limit, filter=expr, output_fields=FIELDS[1:]
        )
        return [Hit(h["id"], float(h["distance"]), dict(h["entity"], id=h["id"])) for h in result[0]]

    def payload(self, hit: Hit) -> bytes | None:
        """The hit's bytes, or None (and the row dropped) when its blob is missing or torn."""
        try:
            data = self.blobs.get(hit.entry["blob"])
        except CorruptBlob:
            data = None
        if data is None:
            self.client.delete(self.collection, ids=[hit.id])
        return data

    # -- housekeeping ------------------------------------------------------------------------

    def entries(self) -> list[dict]:
        """Every row, paged (a plain query stops at Milvus' result window of 16,384 rows)."""
        iterator = self.client.query_iterator(
            self.collection, batch_size=QUERY_PAGE, filter='id != ""', output_fields=FIELDS
        )
        rows = []
        try:
            while page := iterator.next():
                rows.extend(dict(r) for r in page)
        finally:
            iterator.close()
        return rows

    def count(self) -> int:
        result = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(result[0]["count(*)"])

    def remove(self, entries: list[dict]) -> None:
        if not entries:
            return
        self.client.delete(self.collection, ids=[e["id"] for e in entries])
        blobs = sorted({e["blob"] for e in entries})
        still_used = {
            r["blob"] for r in self.client.query(self.collection, filter=f"blob in {blobs!r}", output_fields=["blob"])
        }
        for blob in set(blobs) - still_used:
            self.blobs.delete(blob)

    def enforce_capacity(self) -> int:
        """Evict, in the policy's order, once over a capacity; down to LOW_WATER of it, so that the
        scan of every row this takes is paid once per few percent of the capacity written, not per put.

        The count is exact (Milvus counts); bytes are the last scan's plus what this process wrote
        since, so replicas sharing one store each overshoot by at most their own writes."""
        over_entries = self.max_entries is not None and self.count() > self.max_entries
        over_bytes = self.max_bytes is not None and (
            self.bytes_at_scan is None
            or self.bytes_at_scan + self.bytes_written - self.bytes_written_at_scan > self.max_bytes
        )
        if not (over_entries or over_bytes):
            return 0
        entries = self.entries()
        chosen = victims(entries, self.policy, low_water(self.max_entries), low_water(self.max_bytes), self.rng)
        self.remove(chosen)
        self.evictions += len(chosen)
        self.bytes_at_scan = sum(e["size_bytes"] for e in entries) - sum(e["size_bytes"] for e in chosen)
        self.bytes_written_at_scan = self.bytes_written
        return len(chosen)

    def purge_expired(self) -> int:
        """Remove expired rows and blobs no row points at (a crash's orphans)."""
        expired = [e for e in self.entries() if e["expires"] <= self.clock()]
        self.remove(expired)
        live = {e["blob"] for e in self.entries()}
        orphans = [k for k in self.blobs.keys() if k not in live]
        for key in orphans:
            self.blobs.delete(key)
        torn = self.blobs.drop_temporaries()
        return len(expired) + len(orphans) + torn

    def clear(self) -> None:
        self.client.drop_collection(self.collection)
        self.blobs.clear()
        self._ensure_collection()

    def stats(self) -> dict:
        entries = self.entries()
        now = self.clock()
        by_kind = {}
        for e in entries:
            by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + 1
        return {
            "index": self.uri,
            "collection": self.collection,
            "entries": len(entries),
            "by_kind": by_kind,
            "bytes": sum(e["size_bytes"] for e in entries),
            "hits": sum(e["hits"] for e in entries),
            "expired": sum(e["expires"] <= now for e in entries),
            "evictions": self.evictions,
            "policy": self.policy,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
        }
