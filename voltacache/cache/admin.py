"""Maintenance of a cache index, for the `voltacache cache` commands.

Which caches an index holds is read from the index itself: one collection per embedder and
embedding width, `voltacache_<embedder>_<dim>`. An index the user names must exist (a mistyped
path is refused, nothing is created). A milvus-lite index that no longer opens is repaired by
setting it aside (`<index>.corrupt-<timestamp>`, never deleted) and starting a fresh one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import BadConfiguration, CacheUnavailable, UsageError
from .store import (
    SERVER_CALL_TIMEOUT_S,
    CacheStore,
    collection_name,
    connect,
    default_blob_store,
    holds,
    in_use,
    is_lite_index,
    is_server,
    lite_lock_held,
    lock_index,
    parse_collection,
    reason,
    release_lite_server,
    unavailable,
    unlock_index,
)

OPTION = "--cache-index"


LITE_ENTRIES = {"LOCK", "collections", "databases", ".database-staging"}  # what milvus-lite writes in its folder


def check_exists(index: str) -> None:
    """The cache commands act only on a milvus-lite index (the folder milvus-lite wrote) or a Milvus
    URL: a mistyped path, a file or a folder of something else is refused, nothing created or touched."""
    if is_server(index):
        return
    path = Path(index)
    wrote = "give the path `voltacache deploy --cache` or `generate --cache-index` wrote (a folder ending in .db)"
    if not path.exists():
        raise UsageError(f"{OPTION} {index}: no such cache index; {wrote}")
    if not is_lite_index(path):
        what = "a folder" if path.is_dir() else "a file"
        raise UsageError(f"{OPTION} {index}: {what}, not a milvus-lite index; nothing was changed; {wrote}")


def blob_location(index: str, blob_store: str | None) -> str:
    if blob_store:
        return blob_store
    if is_server(index):
        raise BadConfiguration(
            f"{OPTION} {index}: a Milvus server index needs --blob-store (the folder or s3://bucket/prefix "
            "its servers use)"
        )
    return default_blob_store(index)


def lite_caches(index: str) -> list[tuple[str, int]]:
    """The caches of a milvus-lite index, from its folder (readable even when milvus-lite cannot open it)."""
    root = Path(index) / "collections"
    names = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return sorted(c for c in map(parse_collection, names) if c is not None)


def blob_caches(blobs: str) -> list[tuple[str, int]]:
    """The caches a local blob store holds blobs for (one folder each)."""
    root = Path(blobs)
    if "://" in blobs or not root.is_dir():
        return []
    return sorted(c for c in (parse_collection(p.name) for p in root.iterdir() if p.is_dir()) if c is not None)


def server_caches(index: str) -> list[tuple[str, int]]:
    client = connect(index)
    try:
        names = client.list_collections(timeout=SERVER_CALL_TIMEOUT_S)
    except Exception as e:
        raise unavailable(index, f"the Milvus server failed ({reason(e)})") from e
    finally:
        client.close()
    return sorted(c for c in map(parse_collection, names) if c is not None)


def caches(index: str) -> list[tuple[str, int]]:
    """(embedder, dim) of every cache the index holds."""
    return server_caches(index) if is_server(index) else lite_caches(index)


def describe(found: list[tuple[str, int]]) -> str:
    return ", ".join(f"{name} ({dim}-wide)" for name, dim in found)


def choices(found: list[tuple[str, int]]) -> str:
    names = [name for name, _ in found]
    return " or ".join(
        f"--embedder {name}" if names.count(name) == 1 else f"--embedder {name}:{dim}" for name, dim in found
    )


def choose(index: str, embedder: str | None) -> tuple[str, int] | None:
    """The one cache of the index, or the one `embedder` (NAME or NAME:DIM) names; None when the
    index holds none yet."""
    found = caches(index)
    wanted = found
    if embedder:
        name, _, dim = embedder.partition(":")
        wanted = [c for c in found if c[0] == name and (not dim or str(c[1]) == dim)]
        if not wanted and found:
            raise UsageError(f"--embedder {embedder}: {index} holds no such cache; it holds {describe(found)}")
    if len(wanted) > 1:
        raise UsageError(f"{index} holds several caches, {describe(wanted)}: choose one with {choices(wanted)}")
    return wanted[0] if wanted else None


def open_existing(index: str, blob_store: str | None = None, embedder: str | None = None) -> CacheStore | None:
    """The store of the cache the index holds (its embedder and width read from the index), or
    None when it holds none yet. UsageError for a path that is not an index; CacheUnavailable for
    one that cannot be read, that another process has open, or a server that does not answer."""
    check_exists(index)
    blobs = blob_location(index, blob_store)
    found = choose(index, embedder)
    if found is None:
        return None
    name, dim = found
    return CacheStore(index, blobs, dim=dim, embedder=name)


def empty_stats(index: str) -> dict:
    """What `stats` says of an index that holds no cache yet."""
    return {"index": index, "collection": None, "entries": 0, "by_kind": {}, "bytes": 0, "hits": 0, "expired": 0}


def index_problem(index: str) -> str | None:
    """Why a milvus-lite index (held by this process) cannot be read, or None when every row of
    every collection reads back."""
    try:
        client = connect(index)
    except CacheUnavailable as e:
        return reason(e.__cause__ or e)
    try:
        for name in client.list_collections():
            client.load_collection(name)
            iterator = client.query_iterator(name, batch_size=1000, filter='id != ""', output_fields=["id"])
            try:
                while iterator.next():
                    pass
            finally:
                iterator.close()
    except Exception as e:
        return reason(e)
    finally:
        client.close()
    return None


def repair(index: str, blob_store: str | None = None, purge_blobs: bool = False) -> dict:
    """A milvus-lite index that no longer opens: set it aside as `<index>.corrupt-<timestamp>`
    (never deleted), start a fresh one with the same caches (read from the old folder and the blob
    store), and keep the blobs unless `purge_blobs` (the set-aside index still points at them).
    An index that reads back is left as it is. Refused while another process has it open."""
    if is_server(index):
        raise UsageError(
            f"{OPTION} {index}: repair works on a milvus-lite index; a Milvus server is repaired with its own tools"
        )
    check_exists(index)
    blobs = blob_location(index, blob_store)
    path = Path(index)
    key = lock_index(index)  # another process has it open: CacheUnavailable, nothing touched
    try:
        if holds(key) > 1:
            raise unavailable(index, "open in this process; close it first")
        if lite_lock_held(path):
            raise unavailable(index, in_use(index))
        found = sorted(set(lite_caches(index)) | set(blob_caches(blobs)))
        problem = index_problem(index)
        release_lite_server(index)
        report = {"index": index, "repaired": False, "caches": [collection_name(*c) for c in found]}
        if problem is None:
            return report | {"problem": None}
        others = sorted(p.name for p in path.iterdir() if p.name not in LITE_ENTRIES)
        if others:  # setting the index aside would carry them off: the user's files keep their place
            more = f" and {len(others) - 1} more" if len(others) > 1 else ""
            raise UsageError(
                f"{OPTION} {index}: holds {others[0]}{more}, which milvus-lite did not write; move that out of "
                f"{path.name}, then repair it ({problem})"
            )
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        for n in range(1, 1000):
            if not aside.exists():
                break
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        os.rename(path, aside)
        report |= {"repaired": True, "problem": problem, "set_aside": str(aside), "blobs_kept": 0, "blobs_removed": 0}
        for name, dim in found:
            with CacheStore(index, blobs, dim=dim, embedder=name) as store:
                if purge_blobs:  # the fresh index points at none of them: every blob is an orphan
                    report["blobs_removed"] += store.purge_expired()
                else:
                    report["blobs_kept"] += len(store.blobs.keys())
        if not found:
            connect(index).close()  # a fresh, empty index
        return report
    finally:
        unlock_index(key, index)


def clear(index: str, blob_store: str | None = None, embedder: str | None = None, force: bool = False) -> dict:
    """Remove every entry and blob of the index' cache. With `force`, an index that cannot be read
    is set aside (as `repair` does, never deleted), a fresh one started and its blobs removed."""
    try:
        store = open_existing(index, blob_store, embedder)
    except CacheUnavailable as e:
        if not force or is_server(index):
            detail = getattr(e, "detail", str(e))
            if "repair" in detail:
                detail += "; `voltacache cache clear --force` sets it aside and removes its blobs"
            raise unavailable(index, detail) from e
        report = repair(index, blob_store, purge_blobs=True)
        if not report["repaired"]:
            raise
        return report | {"removed": None}
    if store is None:
        return {"index": index, "collection": None, "removed": 0}
    with store:
        return {"index": index, "collection": store.collection, "removed": store.clear()}
