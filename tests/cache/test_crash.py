"""Crash consistency with a real process killed (SIGKILL) mid-write: nothing broken is ever served."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from voltacache.cache.store import CacheStore, scope_key

SCOPE = scope_key("model-a", steps=20)
VECTOR = [1.0] + [0.0] * 15

# A writer that stores one entry and stops for good at the crash point, where the test kills it.
WRITER = textwrap.dedent(
    """
    import sys, time
    from voltacache.cache import blobs, store as cache_store
    index, root, crash_point, marker, scope = sys.argv[1:]

    def stop_here(*args, **kwargs):
        open(marker, "w").close()
        time.sleep(600)

    store = cache_store.CacheStore(index, root, dim=16)
    if crash_point == "before-index":  # the blob is whole on disk, its index row not yet written
        store.client.upsert = stop_here
    else:  # the blob's bytes are in a temporary, not yet renamed into place
        blobs.os.replace = stop_here
    store.put([1.0] + [0.0] * 15, scope, "image", b"a whole image" * 1000)
    """
)


def files(root):
    return [p for p in root.rglob("*") if p.is_file()]


def kill_writer_at(crash_point: str, tmp_path):
    marker = tmp_path / "at-crash-point"
    args = [str(tmp_path / "index.db"), str(tmp_path / "blobs"), crash_point, str(marker), SCOPE]
    child = subprocess.Popen([sys.executable, "-c", WRITER, *args])
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline, "the writer never reached the crash point"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


@pytest.mark.parametrize("crash_point", ["before-index", "before-rename"])
def test_kill_mid_write_then_restart_serves_nothing_broken(crash_point, tmp_path):
    kill_writer_at(crash_point, tmp_path)
    store = CacheStore(str(tmp_path / "index.db"), tmp_path / "blobs", dim=16)
    assert store.count() == 0 and store.search(VECTOR, SCOPE, "image") == []
    leftovers = files(tmp_path / "blobs")
    assert len(leftovers) == 1, "the kill did not happen mid-write"
    os.utime(leftovers[0], (0, 0))  # old enough to be a crash's, not a write in flight
    assert store.purge_expired() == 1 and files(tmp_path / "blobs") == []
    # the store works on after the crash
    store.put(VECTOR, SCOPE, "image", b"after the restart")
    assert store.payload(store.search(VECTOR, SCOPE, "image")[0]) == b"after the restart"
