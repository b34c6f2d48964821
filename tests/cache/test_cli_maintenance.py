"""`voltacache cache stats | clear | purge-expired | repair`: the cache read from the index itself
(no --dim), a mistyped path refused, a corrupt index repaired (set aside, never deleted)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from voltacache.cache.store import CacheStore
from voltacache.cli import app

from .test_availability import corrupt, make_index

runner = CliRunner()


def cache(*args):
    return runner.invoke(app, ["cache", *args])


def ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def unit(i, dim):
    return np.eye(dim)[i % dim]


def test_a_768_wide_cache_stats_purge_clear(tmp_path):
    """SD 1.5's width: the commands find it in the index (they used to look at 768 only by default,
    and a 64-wide cache showed 0 entries; clear said "cache cleared" and removed nothing)."""
    index, blobs = str(tmp_path / "cache.db"), tmp_path / "cache-blobs"
    with CacheStore(index, blobs, dim=768) as store:
        for i in range(3):
            store.put(unit(i, 768), "scope", "image" if i else "latent", f"payload {i}".encode())
    with CacheStore(index, blobs, dim=768, ttl_s=1, clock=lambda: 0.0) as past:
        past.put(unit(5, 768), "scope", "image", b"expired long ago")
    stats = ok(cache("stats", "--cache-index", index))
    assert (stats["collection"], stats["entries"], stats["expired"]) == ("voltacache_clip_768", 4, 1)
    assert stats["by_kind"] == {"image": 3, "latent": 1}
    assert ok(cache("purge-expired", "--cache-index", index)) == {"purged": 1}
    cleared = cache("clear", "--cache-index", index)
    assert ok(cleared)["removed"] == 3 and "removed 3 entries" in cleared.stderr
    assert ok(cache("stats", "--cache-index", index))["entries"] == 0
    assert not [p for p in blobs.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_an_index_with_several_caches_needs_embedder(tmp_path):
    index, blobs = str(tmp_path / "cache.db"), tmp_path / "cache-blobs"
    for dim, name, entries in ((64, "clip", 1), (768, "clip", 2), (384, "minilm", 3)):
        with CacheStore(index, blobs, dim=dim, embedder=name) as store:
            for i in range(entries):
                store.put(unit(i, dim), "scope", "image", f"{name} {dim} {i}".encode())
    line = one_line_error(cache("stats", "--cache-index", index), 2)
    assert "several caches" in line and "--embedder clip:64" in line and "--embedder minilm" in line
    assert ok(cache("stats", "--cache-index", index, "--embedder", "clip:768"))["entries"] == 2
    assert ok(cache("stats", "--cache-index", index, "--embedder", "minilm"))["entries"] == 3
    assert "clip (64-wide)" in one_line_error(cache("stats", "--cache-index", index, "--embedder", "bert"), 2)
    one_line_error(cache("clear", "--cache-index", index), 2)  # which one: never guessed
    assert ok(cache("clear", "--cache-index", index, "--embedder", "clip:64"))["removed"] == 1
    assert ok(cache("stats", "--cache-index", index, "--embedder", "clip:768"))["entries"] == 2


@pytest.mark.parametrize("command", ["stats", "clear", "purge-expired", "repair"])
def test_a_mistyped_index_is_refused_and_nothing_created(command, tmp_path):
    index = tmp_path / "typo" / "cache.db"
    line = one_line_error(cache(command, "--cache-index", str(index)), 2)
    assert f"--cache-index {index}: no such cache index" in line
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_server_is_one_line_within_seconds(tmp_path):
    started = time.monotonic()
    result = cache("stats", "--cache-index", "http://127.0.0.1:1", "--blob-store", str(tmp_path / "blobs"))
    assert time.monotonic() - started < 5
    assert "no Milvus server answers" in one_line_error(result, 1)
    assert "--blob-store" in one_line_error(cache("stats", "--cache-index", "http://127.0.0.1:1"), 2)


@pytest.mark.parametrize("how", ["garbage"])
def test_repair_sets_a_corrupt_index_aside_and_starts_a_fresh_one(how, tmp_path):
    index = make_index(tmp_path)
    blobs = sorted(p for p in (tmp_path / "cache-blobs").rglob("*") if p.is_file())
    corrupt(index, how)
    before = None
    assert "cache repair --cache-index" in one_line_error(cache("stats", "--cache-index", index), 1)
    assert "clear --force" in one_line_error(cache("clear", "--cache-index", index), 1)
    # a file of the user's inside the index folder would be carried off with it: refused, left in place
    (Path(index) / "mine.txt").write_text("mine")
    line = one_line_error(cache("repair", "--cache-index", index), 2)
    assert "holds mine.txt, which milvus-lite did not write; move that out of cache.db" in line
    assert (Path(index) / "mine.txt").read_text() == "mine" and not list(Path(index).parent.glob("*.corrupt-*"))
    (Path(index) / "mine.txt").rename(tmp_path / "mine.txt")  # the advice, followed

    report = ok(cache("repair", "--cache-index", index))
    aside = Path(report["set_aside"])
    assert report["repaired"] and report["caches"] == ["voltacache_clip_16"]
    assert aside.name.startswith("cache.db.corrupt-") and aside.exists()  # kept, not deleted
    if before is not None:
        assert aside.read_bytes() == before
    assert report["blobs_kept"] == len(blobs) and all(p.exists() for p in blobs)  # the set-aside index needs them

    stats = ok(cache("stats", "--cache-index", index))
    assert (stats["collection"], stats["entries"]) == ("voltacache_clip_16", 0)
    again = cache("repair", "--cache-index", index)
    assert ok(again)["repaired"] is False and "nothing to repair" in again.stderr
    assert ok(cache("purge-expired", "--cache-index", index)) == {"purged": len(blobs)}  # orphans now


@pytest.mark.slow
def test_repair_purge_blobs_and_clear_force(tmp_path):
    index = make_index(tmp_path)
    corrupt(index, "truncated")
    report = ok(cache("clear", "--cache-index", index, "--force"))
    assert report["repaired"] and report["blobs_removed"] == 2 and Path(report["set_aside"]).exists()
    assert not [p for p in (tmp_path / "cache-blobs").rglob("*") if p.is_file()]
    assert ok(cache("stats", "--cache-index", index))["entries"] == 0

    other = tmp_path / "other"
    other.mkdir()
    index = make_index(other)
    corrupt(index, "garbage")
    report = ok(cache("repair", "--cache-index", index, "--purge-blobs"))
    assert report["blobs_removed"] == 2 and report["blobs_kept"] == 0


@pytest.mark.slow
def test_corrupt_index_error_is_one_line_on_the_real_stderr(tmp_path):
    """pymilvus and milvus-lite log tracebacks of their own: none reach the user."""
    index = make_index(tmp_path)
    corrupt(index, "garbage")
    command = [sys.executable, "-m", "voltacache", "cache", "stats", "--cache-index", index]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: cache index {index}: cannot be read")


@pytest.mark.parametrize("what", ["notes.txt", "photos", "cache.db"])
@pytest.mark.parametrize("command", ["stats", "clear", "purge-expired", "repair"])
def test_the_cache_commands_touch_nothing_but_an_index(command, what, tmp_path):
    """A plain file, a folder of something else, or garbage where an index was: one line, nothing renamed or
    removed, and no advice to repair it (repair never renames what milvus-lite did not write)."""
    path = tmp_path / what
    if what == "photos":
        path.mkdir()
        (path / "cat.jpg").write_bytes(b"mine")
    else:
        path.write_bytes(b"my notes" if what == "notes.txt" else os.urandom(4096))
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    extra = ["--force"] if command == "clear" else []
    message = one_line_error(cache(command, "--cache-index", path, *extra), 2)
    kind = "a folder" if what == "photos" else "a file"
    assert f"--cache-index {path}: {kind}, not a milvus-lite index; nothing was changed" in message
    assert "repair" not in message
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [what]
