"""The cache store: a pymilvus index of prompt embeddings over a blob store, with TTL and eviction.

The same code reaches a milvus-lite file (`./cache.db`, embedded, the default) or a Milvus server
(`http://host:19530`) through `MilvusClient`. Every entry carries the model fingerprint and a key
of the generation parameters; a search only ever sees entries of its own scope, unexpired.

Crash consistency: the blob is written (atomically) before the index row, and a row is only
served if its blob exists and matches its key. A crash between the two leaves an orphan blob,
which `purge` removes; it never leaves a row pointing at a torn blob.

One process at a time on a milvus-lite index (a folder, `cache.db/`): milvus-lite locks it, and so
do we, earlier and with a clearer message, through an exclusive `flock` on the sibling
`<index>.lock`, held while any store of this process has the index open. Several processes
(replicas, servers) share a cache through a Milvus server URL instead.

Every failure to open or read the index or the blob store is a `CacheUnavailable` whose message
names the index and what to do; a server URL that does not answer fails within CONNECT_TIMEOUT_S.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadConfiguration, CacheUnavailable, VoltacacheError
from ..request import MAX_PROMPT_BYTES
from .blobs import CorruptBlob, open_blob_store
from .policies import POLICIES, victims

COLLECTION_PREFIX = "voltacache_"
NO_SEED = -1
FLUSH_ROWS = 1000
QUERY_PAGE = 1000
# milvus-lite has no MVCC timestamp to give the iterator, which then warns on every scan
logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
LOW_WATER = 0.95  # eviction brings the cache down to this share of its capacity
CONNECT_TIMEOUT_S = 3.0  # a Milvus server URL that does not answer: unavailable after this long
SERVER_CALL_TIMEOUT_S = 10.0  # each call to a Milvus server (pymilvus would otherwise retry for minutes)
LOCK_SUFFIX = ".lock"
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
# what a person searching the cache sees of an entry (`voltacache cache search`, the web page)
DESCRIPTION = ["model", "prompt", "params"]
PARAMS_BYTES = 2048


IMAGE, LATENT = "image", "latent"  # the kinds of entry: a finished image, a checkpoint latent
LISTING_ORDERS = ("newest", "most-used")
SEARCH_WINDOW = 16384  # Milvus' largest top-k
PROMPT_FANOUT = 8  # nearest_prompts fetches this many hits per prompt it returns (repeats fold)


def cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, on a character boundary."""
    return text.encode()[:limit].decode(errors="ignore")


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


def is_server(index_uri) -> bool:
    """A Milvus server URL (http://, https://, tcp://), not a milvus-lite path."""
    return "://" in str(index_uri)


def default_blob_store(index_uri: str) -> str:
    """The blob folder beside a milvus-lite index: cache.db -> cache-blobs."""
    return str(Path(index_uri).with_suffix("")) + "-blobs"


def collection_name(embedder: str, dim: int) -> str:
    return f"{COLLECTION_PREFIX}{embedder}_{dim}"


def parse_collection(name: str) -> tuple[str, int] | None:
    """voltacache_clip_768 -> ("clip", 768); None for a collection that is not a voltacache cache."""
    if not name.startswith(COLLECTION_PREFIX):
        return None
    embedder, _, dim = name[len(COLLECTION_PREFIX) :].rpartition("_")
    return (embedder, int(dim)) if embedder and dim.isdigit() else None


def is_lite_index(path) -> bool:
    """A folder milvus-lite wrote (its LOCK file or its collections folder)."""
    path = Path(path)
    return path.is_dir() and ((path / "LOCK").is_file() or (path / "collections").is_dir())


def unavailable(index_uri: str, detail: str) -> CacheUnavailable:
    """`cache index X: detail`; `.index` and `.detail` let a caller reword it (a warning)."""
    detail = " ".join(str(detail).split())
    error = CacheUnavailable(f"cache index {index_uri}: {detail}")
    error.index, error.detail = index_uri, detail
    return error


def reason(error: BaseException, limit: int = 200) -> str:
    """One line saying why, from a pymilvus / milvus-lite / OS exception (the detail of ours, whole)."""
    if getattr(error, "detail", None):
        return error.detail
    if callable(getattr(error, "code", None)) and callable(getattr(error, "details", None)):  # a grpc.RpcError
        code = getattr(error.code(), "name", str(error.code()))
        if code == "DEADLINE_EXCEEDED":
            return "no answer before the deadline"
        return f"{code}: {error.details()}"
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quiet_milvus() -> None:
    """pymilvus logs every failed call with its traceback and milvus-lite logs its own; we report
    each failure once, as one line, ourselves."""
    for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def connect(index_uri: str, timeout: float = CONNECT_TIMEOUT_S):
    """A MilvusClient on a milvus-lite path or a server URL, or a CacheUnavailable saying why not."""
    import pymilvus

    quiet_milvus()
    try:
        return pymilvus.MilvusClient(str(index_uri), timeout=timeout)
    except Exception as e:
        if is_server(index_uri):
            raise unavailable(
                index_uri, f"no Milvus server answers within {timeout:g} s ({reason(e)}); start it, or check the URL"
            ) from e
        raise unavailable(index_uri, unreadable(index_uri, e, connecting=True)) from e


def unreadable(index_uri: str, error: BaseException, connecting: bool = False) -> str:
    """Why a milvus-lite index did not open, and the fix. `connecting`: milvus-lite could not even
    start on it (then another process may hold milvus-lite's own lock)."""
    path = Path(index_uri)
    if path.is_file():
        why = "it is a file, not a milvus-lite index folder: corrupt, or written by milvus-lite 2"
    elif connecting and lite_lock_held(path):  # a process that did not take our lock
        return in_use(index_uri)
    else:
        why = f"cannot be read ({reason(error)})"
    return f"{why}; `voltacache cache repair --cache-index {index_uri}` sets it aside and starts a fresh one"


def lite_lock_held(path: Path) -> bool:
    """Whether another process holds milvus-lite's own lock (`<index>/LOCK`): asked only after an
    open failed, when no milvus-lite server of this process holds it."""
    import fcntl

    try:
        fd = os.open(path / "LOCK", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def in_use(index_uri: str, holder: str = "") -> str:
    return (
        f"open in another process{holder}; a milvus-lite index serves one process at a time: stop that one, "
        "or give every process one Milvus server URL (and one --blob-store)"
    )


# -- one process per milvus-lite index ----------------------------------------------------------

_HELD: dict[str, list] = {}  # lock file -> [fd, stores of this process holding it]
_HELD_GUARD = threading.Lock()


def lock_path(index_uri: str) -> str:
    return os.path.realpath(index_uri) + LOCK_SUFFIX


def lock_index(index_uri: str) -> str:
    """Hold `<index>.lock` exclusively (shared by the stores of this process, as milvus-lite shares
    its server); another process holding it: CacheUnavailable at once. Returns the key to release."""
    import fcntl

    key = lock_path(index_uri)
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return key
        try:
            fd = os.open(key, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise unavailable(index_uri, f"cannot create its lock file {key} ({e.strerror or e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            except OSError:
                pid = ""
            os.close(fd)
            raise unavailable(index_uri, in_use(index_uri, f" (pid {pid})" if pid.isdigit() else "")) from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = [fd, 1]
        return key


def holds(key: str) -> int:
    """How many stores of this process hold the lock."""
    with _HELD_GUARD:
        return _HELD[key][1] if key in _HELD else 0


def unlock_index(key: str, index_uri: str) -> None:
    """Release one hold; the last one also stops this process' milvus-lite server on the index."""
    with _HELD_GUARD:
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
        release_lite_server(index_uri)
        os.close(entry[0])  # releases the flock


def release_lite_server(index_uri: str) -> None:
    """milvus-lite keeps one in-process server per path until exit, holding the folder: stop it."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(str(index_uri))


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
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ):
        """Opens (creating what is missing) the index and the blob store; CacheUnavailable when either
        cannot be opened or read, another process holds the milvus-lite index, or a server URL does
        not answer within `connect_timeout`. `close()` (or `with`) releases the index."""
        if policy not in POLICIES:
            raise BadConfiguration(f"--cache-policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.uri = str(index_uri)
        # one collection per embedder (their vectors are not comparable), each with its own blobs
        self.collection = collection_name(embedder, dim)
        self.dim, self.ttl_s, self.policy = dim, ttl_s, policy
        self.call = {"timeout": SERVER_CALL_TIMEOUT_S} if is_server(self.uri) else {}
        self.client, self._lock = None, None
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.rng, self.clock = random.Random(seed), clock
        self.evictions = 0
        self.bytes_written = 0
        self.unflushed = 0
        self.bytes_at_scan, self.bytes_written_at_scan = None, 0
        try:
            if not is_server(self.uri):
                try:
                    Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise unavailable(self.uri, f"cannot create its folder ({e.strerror or e})") from e
                self._lock = lock_index(self.uri)
            try:
                self.blobs = open_blob_store(f"{str(blobs).rstrip('/')}/{self.collection}")
            except VoltacacheError as e:
                raise unavailable(self.uri, str(e)) from e
            self.client = connect(self.uri, connect_timeout)
            try:
                self._ensure_collection()
            except Exception as e:
                if is_server(self.uri):
                    raise unavailable(self.uri, f"the Milvus server failed ({reason(e)})") from e
                raise unavailable(self.uri, unreadable(self.uri, e)) from e
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the index (its lock, and this process' milvus-lite server on it once no store
        uses it); the store cannot be used after."""
        client, self.client = self.client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
        lock, self._lock = self._lock, None
        if lock is not None:
            unlock_index(lock, self.uri)

    def __enter__(self) -> CacheStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure_collection(self):
        from pymilvus import DataType, MilvusClient

        # a cheap first call, on a short deadline: a server that stopped answering fails the open in seconds
        answers = {"timeout": CONNECT_TIMEOUT_S} if self.call else {}
        if self.client.has_collection(self.collection, **answers):
            # a file a killed process left behind reopens released: searching it needs a load
            self.client.load_collection(self.collection, **self.call)
            fields = self.client.describe_collection(self.collection, **self.call)["fields"]
            self.described = {f["name"] for f in fields} >= set(DESCRIPTION)
            return
        self.described = True
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("scope", DataType.VARCHAR, max_length=64)
        schema.add_field("kind", DataType.VARCHAR, max_length=16)
        schema.add_field("blob", DataType.VARCHAR, max_length=64)
        schema.add_field("model", DataType.VARCHAR, max_length=64)
        schema.add_field("prompt", DataType.VARCHAR, max_length=MAX_PROMPT_BYTES)
        schema.add_field("params", DataType.VARCHAR, max_length=PARAMS_BYTES)
        for name in ("seed", "step", "size_bytes", "hits"):
            schema.add_field(name, DataType.INT64)
        for name in ("created", "expires", "last_access", "benefit"):
            schema.add_field(name, DataType.DOUBLE)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="COSINE")
        self.client.create_collection(
            self.collection, schema=schema, index_params=index, consistency_level="Strong", **self.call
        )

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
            if self.described:
                rows[-1].update(
                    model=item.get("model", ""),
                    prompt=cut(item.get("prompt", ""), MAX_PROMPT_BYTES),
                    params=cut(json.dumps(item.get("params", {}), sort_keys=True), PARAMS_BYTES),
                )
        self.client.upsert(self.collection, rows, **self.call)
        self.unflushed += len(rows)
        if self.unflushed >= FLUSH_ROWS:
            # searches scan unsealed rows slowly (milvus-lite: 2.3 s at 10k rows, 30 ms once flushed)
            self.client.flush(self.collection, **self.call)
            self.unflushed = 0
        self.enforce_capacity()
        return [row["id"] for row in rows]

    def touch(self, hit: Hit) -> None:
        """Count a hit (frequency and recency feed LFU, LRU and LCBFU)."""
        rows = self.client.get(self.collection, ids=[hit.id], output_fields=["*"], **self.call)
        if rows:
            row = dict(rows[0])
            row["hits"], row["last_access"] = int(row["hits"]) + 1, self.clock()
            self.client.upsert(self.collection, [row], **self.call)

    # -- reading -----------------------------------------------------------------------------

    def search(self, vector, scope: str, kind: str, seed: int | None = None, limit: int = 4) -> list[Hit]:
        """Nearest unexpired entries of this scope and kind; a request with a seed sees only its seed."""
        expr = f'scope == "{scope}" and kind == "{kind}" and expires > {self.clock()!r}'
        if seed is not None:
            expr += f" and seed == {int(seed)}"
        result = self.client.search(
            self.collection,
            data=[[float(x) for x in vector]],
            limit=limit,
            filter=expr,
            output_fields=FIELDS[1:],
            **self.call,
        )
        return [Hit(h["id"], float(h["distance"]), dict(h["entity"], id=h["id"])) for h in result[0]]

    def payload(self, hit: Hit) -> bytes | None:
        """The hit's bytes, or None (and the row dropped) when its blob is missing or torn."""
        try:
            data = self.blobs.get(hit.entry["blob"])
        except CorruptBlob:
            data = None
        if data is None:
            self.client.delete(self.collection, ids=[hit.id], **self.call)
        return data

    # -- what a person browses: entries of one model, described ----------------------------------

    def _browsable(self, model: str | None) -> str:
        """The filter of the images that may be served, of one model (or of all: None);
        CacheUnavailable for a collection written before entries carried their prompts (Milvus
        cannot add the fields)."""
        if not self.described:
            raise unavailable(
                self.uri,
                f"its collection {self.collection} was written before entries kept their prompts, so it cannot "
                "be searched; it still serves generation, and `voltacache cache clear` starts a searchable one",
            )
        expr = f'kind == "{IMAGE}" and expires > {self.clock()!r}'
        return expr if model is None else f'model == "{model}" and {expr}'

    def nearest(self, vector, model: str, limit: int) -> list[Hit]:
        """The stored images of `model` nearest an embedding, most similar first."""
        result = self.client.search(
            self.collection,
            data=[[float(x) for x in vector]],
            limit=limit,
            filter=self._browsable(model),
            output_fields=FIELDS[1:] + DESCRIPTION,
            **self.call,
        )
        return [Hit(h["id"], float(h["distance"]), dict(h["entity"], id=h["id"])) for h in result[0]]

    def nearest_prompts(self, vector, model: str, limit: int) -> list[Hit]:
        """The distinct stored prompts of `model` nearest an embedding, each once with its best
        match, most similar first. Over-fetches and folds repeats here: a Milvus 2.3 server has no
        group_by."""
        fetch = min(SEARCH_WINDOW, limit * PROMPT_FANOUT)
        best = {}
        for hit in self.nearest(vector, model, fetch):
            best.setdefault(hit.entry["prompt"], hit)
        return list(best.values())[:limit]

    def listing(self, model: str | None, order: str, limit: int) -> list[dict]:
        """Stored images, newest or most used first; every model's with `model` None."""
        if order not in LISTING_ORDERS:
            raise BadConfiguration(f"--order {order!r}: choose one of {', '.join(LISTING_ORDERS)}")
        rows = self._scan(self._browsable(model), FIELDS + DESCRIPTION)
        if order == "newest":
            key = lambda e: (e["created"], e["id"])  # noqa: E731
        else:
            key = lambda e: (e["hits"], e["last_access"], e["id"])  # noqa: E731
        return sorted(rows, key=key, reverse=True)[:limit]

    # -- housekeeping ------------------------------------------------------------------------

    def entries(self) -> list[dict]:
        """Every row."""
        return self._scan('id != ""', FIELDS)

    def _scan(self, expr: str, fields: list[str]) -> list[dict]:
        """The rows `expr` selects, paged (a plain query stops at Milvus' result window of 16,384 rows)."""
        iterator = self.client.query_iterator(
            self.collection, batch_size=QUERY_PAGE, filter=expr, output_fields=fields, **self.call
        )
        rows = []
        try:
            while page := iterator.next():
                rows.extend(dict(r) for r in page)
        finally:
            iterator.close()
        return rows

    def count(self) -> int:
        result = self.client.query(self.collection, filter="", output_fields=["count(*)"], **self.call)
        return int(result[0]["count(*)"])

    def remove(self, entries: list[dict]) -> None:
        if not entries:
            return
        self.client.delete(self.collection, ids=[e["id"] for e in entries], **self.call)
        blobs = sorted({e["blob"] for e in entries})
        used = self.client.query(self.collection, filter=f"blob in {blobs!r}", output_fields=["blob"], **self.call)
        still_used = {r["blob"] for r in used}
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

    def clear(self) -> int:
        """Remove every entry and blob of this collection; returns how many entries there were."""
        removed = self.count()
        self.client.drop_collection(self.collection, **self.call)
        self.blobs.clear()
        self._ensure_collection()
        return removed

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
