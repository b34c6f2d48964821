"""The cache is an accelerator: settings that cannot work are refused when written; an index that
cannot be opened (corrupt, unreachable, open in another process) is reported once and generation
goes on without it; a store that fails mid-way turns lookups into misses. Real milvus-lite, no mocks."""

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers import MILVUS_PORTS

from voltacache.cache.layers import RETRY_AFTER_S, CacheSettings, RequestCache, open_cache
from voltacache.cache.store import CONNECT_TIMEOUT_S, CacheStore
from voltacache.errors import BadConfiguration, CacheUnavailable

VECTOR = np.eye(16)[0]
IMAGE = np.zeros((1, 8, 8, 3), np.uint8)
LATENT = np.ones((1, 4, 2, 2), np.float32)


def warning_lines(warns, index):
    assert len(warns) == 1, warns
    assert warns[0].startswith(f"voltacache warning: cache {index} unavailable: ")
    assert warns[0].endswith("; generating without it") and "\n" not in warns[0]
    return warns[0]


def make_index(tmp_path, entries=2) -> str:
    """A real milvus-lite index (16-wide clip cache) with entries and their blobs, closed."""
    index = str(tmp_path / "cache.db")
    with CacheStore(index, tmp_path / "cache-blobs", dim=16) as store:
        for i in range(entries):
            store.put(np.eye(16)[i], "scope", "image", f"image {i}".encode())
    return index


def corrupt(index: str, how: str) -> None:
    path = __import__("pathlib").Path(index)
    if how == "a file":  # garbage where the index was
        shutil.rmtree(path)
        path.write_bytes(os.urandom(4096))
        return
    for f in path.rglob("*"):
        if f.is_file() and f.name != "LOCK":
            if how == "garbage":
                f.write_bytes(os.urandom(max(f.stat().st_size, 64)))
            else:  # truncated
                os.truncate(f, f.stat().st_size // 2)


# -- settings are checked when written ---------------------------------------------------------


@pytest.mark.parametrize(
    "fields, option",
    [
        (dict(index="{tmp}/folder"), "--cache-index"),  # an existing folder: `deploy --cache DIR`
        (dict(index="{tmp}/folder.db"), "not a milvus-lite index"),  # ... even named .db
        (dict(index="{tmp}/cache"), ".db"),
        (dict(index="{tmp}/file.txt/cache.db"), "is a file"),
        (dict(index="http://127.0.0.1:19530"), "--blob-store"),
        (dict(index="ftp://host/cache", blob_store="{tmp}/blobs"), "http://"),
        (dict(index="{tmp}/cache.db", blob_store="{tmp}/file.txt"), "--blob-store"),
        (dict(index="{tmp}/cache.db", blob_store="gs://bucket/x"), "--blob-store"),
        (dict(policy="lru2"), "--cache-policy"),
        (dict(embedder="bert"), "--cache-embedder"),
        (dict(bands="0.9"), "--cache-bands"),
        (dict(bands="0.9:1.5"), "--cache-bands"),
        (dict(semantic_threshold=0.0), "--cache-threshold"),
        (dict(semantic_threshold=1.5), "--cache-threshold"),
        (dict(ttl_s=0), "--cache-ttl"),
        (dict(max_entries=0), "--cache-max-entries"),
        (dict(max_bytes=-1), "--cache-max-bytes"),
    ],
)
def test_settings_that_cannot_work_are_refused_when_written(fields, option, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "photo.png").write_bytes(b"not an index")
    (tmp_path / "folder.db").mkdir()
    (tmp_path / "folder.db" / "notes.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("a file")
    fields = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in fields.items()}
    with pytest.raises(BadConfiguration, match=option.replace(".", r"\.")) as refused:
        CacheSettings(**fields)
    assert refused.value.exit_code == 2
    # what the Triton denoiser reads back goes through the same check; what lies at the path (something that
    # appeared after deploy) is found when the cache opens: the server then goes on without it
    if "index" in fields:
        parameters = {f"cache_{k}": str(v) for k, v in fields.items()}
        if option in ("not a milvus-lite index", "is a file") or "file.txt" in str(fields.get("blob_store")):
            with pytest.raises(CacheUnavailable):
                CacheSettings.from_parameters(parameters).open("model", 16)
        else:
            with pytest.raises(BadConfiguration):
                CacheSettings.from_parameters(parameters)


def test_settings_that_work_are_accepted(tmp_path):
    index = make_index(tmp_path)
    (tmp_path / "empty.db").mkdir()
    for settings in (
        CacheSettings(index),  # an existing milvus-lite index (a folder)
        CacheSettings(str(tmp_path / "empty.db")),
        CacheSettings(str(tmp_path / "new" / "cache.db")),
        CacheSettings("http://milvus:19530", blob_store="s3://bucket/blobs"),
        CacheSettings("off"),
        CacheSettings(),
    ):
        assert CacheSettings.from_parameters(settings.parameters()).index == (
            settings.index and (settings.index if "://" in settings.index else os.path.abspath(settings.index))
        )
    with pytest.raises(BadConfiguration, match="cache_ttl_s"):
        CacheSettings.from_parameters({"cache_index": index, "cache_ttl_s": "a week"})


def test_deploy_refuses_a_folder_as_cache_index(engines_dir, tmp_path):
    from typer.testing import CliRunner

    from voltacache.cli import app

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    args = ["deploy", "--engines", str(engines_dir), "--repo", str(tmp_path / "repo"), "--cache", str(folder)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: --cache {folder}")  # deploy's own name for the option
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "repo").exists()


# -- an index that cannot be opened: reported once, generation goes on ----------------------------


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_index_is_reported_once_and_skipped(how, tmp_path):
    index = make_index(tmp_path)
    corrupt(index, how)
    warns = []
    assert open_cache(CacheSettings(index), "model", 16, warns.append) is None
    line = warning_lines(warns, index)
    assert f"voltacache cache repair --cache-index {index}" in line
    with pytest.raises(CacheUnavailable, match="cache repair"):
        CacheSettings(index).open("model", 16)


def test_a_file_where_the_index_was_is_refused_when_written_and_skipped_when_served(tmp_path):
    """Garbage (or a user's file) where an index was: `generate --cache-index` and `deploy --cache` refuse
    it (exit 2); a server whose index was replaced by one after deploy serves without a cache, and says
    so, without advising a repair that would refuse it."""
    index = make_index(tmp_path)
    settings = CacheSettings(index)
    corrupt(index, "a file")
    with pytest.raises(BadConfiguration, match=f"--cache-index {index}: a file, not a milvus-lite index"):
        CacheSettings(index)
    served = CacheSettings.from_parameters(settings.parameters())  # as the denoiser reads it
    warns = []
    assert open_cache(served, "model", 16, warns.append) is None
    line = warning_lines(warns, index)
    assert "a file, not a milvus-lite index" in line and "repair" not in line


@pytest.mark.parametrize("server", ["refused", "silent"])
@pytest.mark.slow
def test_unreachable_server_is_reported_within_seconds(server, tmp_path):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = "http://127.0.0.1:1" if server == "refused" else f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings = CacheSettings(url, blob_store=str(tmp_path / "blobs"))
        warns, started = [], time.monotonic()
        assert open_cache(settings, "model", 16, warns.append) is None
        elapsed = time.monotonic() - started
    assert elapsed < CONNECT_TIMEOUT_S + 2
    assert "no Milvus server answers" in warning_lines(warns, url)


def test_unreadable_blob_store_is_reported_once(tmp_path):
    settings = CacheSettings(str(tmp_path / "cache.db"), blob_store=str(tmp_path / "blobs"))
    (tmp_path / "blobs").write_text("replaced by a file after the deployment")
    warns = []
    assert open_cache(settings, "model", 16, warns.append) is None
    assert "blob store" in warning_lines(warns, settings.index)


# -- one process per milvus-lite index ---------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from voltacache.cache.store import CacheStore
    store = CacheStore(sys.argv[1], sys.argv[2], dim=16)
    print("ready", flush=True)
    time.sleep(600)
    """
)
OPENER = textwrap.dedent(
    """
    import sys
    from voltacache.cache.store import CacheStore
    with CacheStore(sys.argv[1], sys.argv[2], dim=16) as store:
        print(store.count())
    """
)


def test_second_process_on_one_index_is_refused_at_once(tmp_path):
    from typer.testing import CliRunner

    from voltacache.cli import app

    index, blobs = make_index(tmp_path), str(tmp_path / "cache-blobs")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, index, blobs], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        started = time.monotonic()
        with pytest.raises(CacheUnavailable, match=f"open in another process \\(pid {holder.pid}\\)") as refused:
            CacheStore(index, blobs, dim=16)
        assert time.monotonic() - started < 2
        assert "Milvus server URL" in str(refused.value)

        warns = []
        assert open_cache(CacheSettings(index), "model", 16, warns.append) is None
        assert "open in another process" in warning_lines(warns, index)

        runner = CliRunner()
        for command in ("stats", "repair"):
            result = runner.invoke(app, ["cache", command, "--cache-index", index])
            assert result.exit_code == 1, result.output
            assert result.stderr.startswith("error: cache index") and "open in another process" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
        assert not list(tmp_path.glob("cache.db.corrupt-*"))  # repair touched nothing
    finally:
        holder.kill()
        holder.wait()
    with CacheStore(index, blobs, dim=16) as store:  # the holder's lock went with it
        assert store.count() == 2


def test_closing_a_store_lets_another_process_open_the_index(tmp_path):
    index, blobs = make_index(tmp_path), str(tmp_path / "cache-blobs")
    store = CacheStore(index, blobs, dim=16)
    other = CacheStore(index, blobs, dim=16)  # one process: shared, as milvus-lite shares its server
    store.close()
    child = subprocess.run([sys.executable, "-c", OPENER, index, blobs], capture_output=True, text=True)
    assert child.returncode == 1 and "open in another process" in child.stderr  # `other` still has it
    other.close()
    child = subprocess.run([sys.executable, "-c", OPENER, index, blobs], capture_output=True, text=True)
    assert child.returncode == 0 and child.stdout.strip() == "2", child.stderr


# -- a store that fails mid-way: misses, not errors ----------------------------------------------


def open_request_cache(tmp_path, warns):
    cache = open_cache(CacheSettings(str(tmp_path / "cache.db")), "model", 16, warns.append)
    assert isinstance(cache, RequestCache) and cache.warn == warns.append
    return cache


def test_lookup_and_remember_fail_soft_when_the_index_goes(tmp_path):
    warns = []
    cache = open_request_cache(tmp_path, warns)
    scope = cache.scope(steps=4)
    cache.remember(VECTOR, scope, 1, 4, IMAGE, {1: LATENT})
    assert cache.lookup(VECTOR, scope, 4, 1).layer == "semantic"
    cache.store.client.close()  # the index is gone from under the cache
    assert cache.lookup(VECTOR, scope, 4, 1).layer == "miss"
    cache.remember(VECTOR, scope, 1, 4, IMAGE, {})
    assert cache.lookup(VECTOR, scope, 4, 1).layer == "miss"
    assert "a lookup failed" in warning_lines(warns, cache.store.uri)  # once, not once per call
    cache.failed_at -= RETRY_AFTER_S  # later, it is tried again: still failing, still no second warning
    assert cache.lookup(VECTOR, scope, 4, 1).layer == "miss"
    assert len(warns) == 1 and cache.counts["errors"] == 2


def test_remember_fails_soft_when_the_blob_store_goes(tmp_path):
    warns = []
    cache = open_request_cache(tmp_path, warns)
    scope = cache.scope(steps=4)
    cache.remember(VECTOR, scope, 1, 4, IMAGE, {})
    blobs = tmp_path / "cache-blobs"
    shutil.rmtree(blobs)  # the blob folder deleted: its entries become misses, and are dropped
    assert cache.lookup(VECTOR, scope, 4, 1).layer == "miss" and warns == []
    blobs.write_text("a file where the blob folder was")  # now nothing can be stored
    cache.remember(VECTOR, scope, 2, 4, IMAGE * 2, {})
    assert "storing failed" in warning_lines(warns, cache.store.uri)
    blobs.unlink()  # back: after the retry interval the cache stores and serves again
    cache.failed_at -= RETRY_AFTER_S
    cache.remember(VECTOR, scope, 3, 4, IMAGE * 3, {})
    decision = cache.lookup(VECTOR, scope, 4, 3)
    assert decision.layer == "semantic" and (decision.image == IMAGE * 3).all() and len(warns) == 1


# -- a Milvus server that stops answering --------------------------------------------------------


@pytest.mark.milvus
def test_a_server_that_stops_answering_costs_bounded_time(tmp_path, new_port):
    """SIGSTOP: the TCP connection stays up, no answer comes (an untimed pymilvus call waited ~50 s)."""
    import signal
    from pathlib import Path

    from voltacache.cache.store import SERVER_CALL_TIMEOUT_S

    port = new_port()
    args = [str(Path(sys.executable).parent / "milvus-server"), "--data", str(tmp_path / "milvus")]
    args += ["--proxy-port", str(port)] + [a for name in MILVUS_PORTS for a in (f"--{name}-port", str(new_port()))]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    settings = CacheSettings(f"http://127.0.0.1:{port}", blob_store=str(tmp_path / "blobs"))
    try:
        deadline, cache = time.monotonic() + 180, None
        while cache is None:
            assert server.poll() is None and time.monotonic() < deadline, "milvus-server did not start"
            cache = open_cache(settings, "model", 16, lambda message: None)
            time.sleep(0 if cache else 1)
        warns = []
        cache.warn = warns.append
        scope = cache.scope(steps=4)
        cache.remember(VECTOR, scope, 1, 4, IMAGE, {})
        assert cache.lookup(VECTOR, scope, 4, 1).layer == "semantic"

        os.killpg(server.pid, signal.SIGSTOP)
        started = time.monotonic()
        assert cache.lookup(VECTOR, scope, 4, 1).layer == "miss"
        assert time.monotonic() - started < SERVER_CALL_TIMEOUT_S + 2
        started = time.monotonic()  # then skipped for a while: no request waits again
        assert cache.lookup(VECTOR, scope, 4, 1).layer == "miss" and time.monotonic() - started < 0.1
        assert "a lookup failed" in warning_lines(warns, settings.index)

        warns.clear()
        started = time.monotonic()
        assert open_cache(settings, "model", 16, warns.append) is None
        assert time.monotonic() - started < CONNECT_TIMEOUT_S + 2
        warning_lines(warns, settings.index)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
