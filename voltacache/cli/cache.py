"""`voltacache cache ...`: the cross-request cache's maintenance, warm-up, search and listing (voltacache.cache)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import typer
from rich.markup import escape

from ..cache.layers import CacheSettings
from ..cache.search import DEFAULT_TOP, MAX_TOP
from ..cache.store import LISTING_ORDERS
from ..errors import UsageError
from ..outputs import SEARCH_RESULTS, check_folder, staged_output
from ..request import Request
from .app import cache_app, err, user_errors


def _open_store(index: str, blob_store: str | None, embedder: str | None):
    """The store of the cache the index holds (embedder and width read from the index), or None."""
    from ..cache.admin import open_existing

    return open_existing(index, blob_store, embedder)


CACHE_INDEX = typer.Option(..., "--cache-index", help="The cache index: milvus-lite file or Milvus server URL.")
CACHE_EMBEDDER = typer.Option("clip", help="Which embedder's entries: clip or minilm.")
CACHE_CHOICE = typer.Option(
    None,
    "--embedder",
    help="Which cache, when the index holds several: clip, minilm, or NAME:DIM (e.g. clip:768).",
)
BLOB_STORE = typer.Option(None, help="Blob folder or s3://bucket/prefix (default: beside a file index).")


@cache_app.command("stats")
@user_errors
def cache_stats(
    index: str = CACHE_INDEX,
    embedder: str | None = CACHE_CHOICE,
    blob_store: str | None = BLOB_STORE,
):
    """Entries, bytes, hits and evictions of the cache."""
    from ..cache.admin import empty_stats

    store = _open_store(index, blob_store, embedder)
    if store is None:
        print(json.dumps(empty_stats(index), indent=2))
        return
    with store:
        print(json.dumps(store.stats(), indent=2))


@cache_app.command("clear")
@user_errors
def cache_clear(
    index: str = CACHE_INDEX,
    embedder: str | None = CACHE_CHOICE,
    blob_store: str | None = BLOB_STORE,
    force: bool = typer.Option(
        False, help="Also on an index that cannot be read: set it aside (<index>.corrupt-<time>) and remove its blobs."
    ),
):
    """Remove every entry and blob; prints how many entries it removed."""
    from ..cache.admin import clear

    report = clear(index, blob_store, embedder, force)
    print(json.dumps(report))
    if report.get("repaired"):
        err.print(
            f"cache cleared: {escape(index)} could not be read and was set aside as {escape(report['set_aside'])}; "
            f"a fresh index started, {report['blobs_removed']} blobs removed",
            soft_wrap=True,
        )
    else:
        err.print(f"cache cleared: removed {report['removed']} entries", soft_wrap=True)


@cache_app.command("purge-expired")
@user_errors
def cache_purge(
    index: str = CACHE_INDEX,
    embedder: str | None = CACHE_CHOICE,
    blob_store: str | None = BLOB_STORE,
):
    """Remove entries past their TTL and blobs no entry points at."""
    store = _open_store(index, blob_store, embedder)
    if store is None:
        print(json.dumps({"purged": 0}))
        return
    with store:
        print(json.dumps({"purged": store.purge_expired()}))


@cache_app.command("repair")
@user_errors
def cache_repair(
    index: str = CACHE_INDEX,
    blob_store: str | None = BLOB_STORE,
    purge_blobs: bool = typer.Option(
        False, help="Also remove the blobs (the set-aside index still points at them; kept by default)."
    ),
):
    """A milvus-lite index that no longer opens: set it aside as <index>.corrupt-<time> (never deleted)
    and start a fresh one. An index that reads back is left as it is."""
    from ..cache.admin import repair

    report = repair(index, blob_store, purge_blobs)
    print(json.dumps(report))
    if not report["repaired"]:
        err.print(f"{escape(index)} reads back: nothing to repair", soft_wrap=True)
        return
    blobs = (
        f"{report['blobs_removed']} blobs removed"
        if purge_blobs
        else f"{report['blobs_kept']} blobs kept for it (`cache purge-expired` removes them)"
    )
    err.print(
        f"repaired: {escape(index)} set aside as {escape(report['set_aside'])}; a fresh index started; {blobs}",
        soft_wrap=True,
    )


@cache_app.command("warm")
@user_errors
def cache_warm(
    prompts: Path = typer.Option(..., help="A file of prompts, one per line."),
    engines: Path = typer.Option(..., help="Engines folder (the cache is scoped to their model)."),
    index: str = CACHE_INDEX,
    embedder: str = CACHE_EMBEDDER,
    blob_store: str | None = BLOB_STORE,
    steps: int = typer.Option(Request.steps),
    guidance: float = typer.Option(Request.guidance),
    scheduler: str = typer.Option(Request.scheduler),
    seed: int | None = typer.Option(None, help="Seed of the first prompt (line i gets seed + i); default random."),
    out: Path = typer.Option(Path("build/warm/img.png"), help="Where the generated images go."),
    force: bool = typer.Option(False, help="Replace image files that exist."),
):
    """Generate and store the prompts of a file (refresh mode: each is computed and stored)."""
    from ..generate import Batch, generate_in_process, read_prompts
    from ..runtime.manifests import read_engine_manifest

    lines = read_prompts(prompts)
    if not lines:
        raise UsageError(f"--prompts {prompts}: no prompt in it")
    template = Request("(each line's own prompt)", steps=steps, guidance=guidance, seed=seed, scheduler=scheduler)
    template = template.replace(cache_mode="refresh").check()
    batch = Batch(lines, template, out, read_engine_manifest(engines).export.batch, force)
    records = list(generate_in_process(engines, batch, CacheSettings(index, embedder, blob_store)))
    for failure in batch.failures:
        print(f"error: {failure}", file=sys.stderr)
    err.print(f"warmed {len(records)} entries")
    if batch.failures:
        raise typer.Exit(1)


SEARCH_URL = typer.Option(None, help="HOST:PORT of a voltacache Triton server: search its cache there.")
SEARCH_INDEX = typer.Option(None, "--cache-index", help="In process: the cache index (milvus-lite file or Milvus URL).")
SEARCH_ENGINES = typer.Option(None, help="In process: the engines whose model's entries to show (and embed with).")
SEARCH_OUT = typer.Option(None, help="A new folder for the images (PNG) and search.json.")
SEARCH_FORCE = typer.Option(False, help="Replace a folder of search results --out names.")
SEARCH_THUMBNAIL = typer.Option(0, help="Longest side of each image, in pixels (0: as stored).")
SEARCH_PROTOCOL = typer.Option("grpc", help="grpc or http (with --url).")


def _search(query, url, protocol, index, engines, embedder, blob_store):
    """`query` through a server (--url) or in process on an index (--cache-index)."""
    from ..cache.search import search_index

    query = query.check()
    if (url is None) == (index is None):
        raise UsageError("give exactly one of --url HOST:PORT (a server's cache) or --cache-index INDEX (in process)")
    if url is not None:
        if engines is not None or blob_store is not None:
            raise UsageError("--engines and --blob-store are for in process (--cache-index); the server knows its own")
        from ..serving.client import Client

        return Client(url, protocol).search(query)
    return search_index(query, index, blob_store, engines, embedder)


def _search_and_show(query, out: Path | None, force: bool, *where) -> None:
    """Check --out first (before any compute), search, then show and write what was found."""
    if out is not None:
        check_folder(out, SEARCH_RESULTS, force=force)
    _show(_search(query, *where), query, out, force)


def _show(found, query, out: Path | None, force: bool) -> None:
    """A table on stdout; with --out, each image as a PNG and every record in search.json."""
    import time as clock

    from ..generate import save

    if not found:
        err.print("nothing found: the cache holds no entry of this model for that", soft_wrap=True)
    for rank, f in enumerate(found, 1):
        when = clock.strftime("%Y-%m-%d %H:%M", clock.localtime(f.created))
        size = f"{f.params.get('width', '?')}x{f.params.get('height', '?')}"
        similarity = f"{f.similarity:.3f}" if query.embeds else "-"
        print(
            f"{rank:>3}  {similarity:>6}  hits {f.hits:<4} seed {f.seed:<11} steps {f.params.get('steps', '?'):<4} "
            f"{size:<9} {when}  {f.prompt}"
        )
    if out is None:
        return
    with staged_output(out, SEARCH_RESULTS, force=force) as stage:
        records = []
        for rank, f in enumerate(found, 1):
            record = f.record()
            if f.image is not None:
                record["file"] = f"{rank:02d}-{f.id[:12]}.png"
                save(f.image, stage / record["file"])
            records.append(record)
        document = {"query": dataclasses.asdict(query), "results": records}
        (stage / "search.json").write_text(json.dumps(document, indent=2))
    err.print(f"wrote {len(found)} results to {escape(str(out))}", soft_wrap=True)


@cache_app.command("search")
@user_errors
def cache_search(
    prompt: str = typer.Argument(..., help="The prompt to look near."),
    top: int = typer.Option(DEFAULT_TOP, help=f"How many entries (at most {MAX_TOP})."),
    prompts: bool = typer.Option(False, "--prompts", help="Recommend the stored prompts nearest PROMPT (no images)."),
    thumbnail: int = SEARCH_THUMBNAIL,
    out: Path | None = SEARCH_OUT,
    force: bool = SEARCH_FORCE,
    url: str | None = SEARCH_URL,
    protocol: str = SEARCH_PROTOCOL,
    index: str | None = SEARCH_INDEX,
    engines: Path | None = SEARCH_ENGINES,
    embedder: str | None = CACHE_CHOICE,
    blob_store: str | None = BLOB_STORE,
):
    """The stored images of this model nearest a prompt, most similar first (or, with --prompts,
    the stored prompts nearest it)."""
    from ..cache.search import SearchQuery

    query = SearchQuery("prompts" if prompts else "images", prompt, top, thumbnail)
    _search_and_show(query, out, force, url, protocol, index, engines, embedder, blob_store)


@cache_app.command("list")
@user_errors
def cache_list(
    order: str = typer.Option("newest", help="newest or most-used first."),
    top: int = typer.Option(20, help=f"How many entries (at most {MAX_TOP})."),
    thumbnail: int = SEARCH_THUMBNAIL,
    out: Path | None = SEARCH_OUT,
    force: bool = SEARCH_FORCE,
    url: str | None = SEARCH_URL,
    protocol: str = SEARCH_PROTOCOL,
    index: str | None = SEARCH_INDEX,
    engines: Path | None = typer.Option(None, help="In process: only this model's entries (default: every model's)."),
    embedder: str | None = CACHE_CHOICE,
    blob_store: str | None = BLOB_STORE,
):
    """What the cache holds: its stored images, newest or most used first."""
    from ..cache.search import SearchQuery

    if order not in LISTING_ORDERS:
        raise UsageError(f"--order {order!r}: choose one of {', '.join(LISTING_ORDERS)}")
    query = SearchQuery(order, "", top, thumbnail)
    _search_and_show(query, out, force, url, protocol, index, engines, embedder, blob_store)
