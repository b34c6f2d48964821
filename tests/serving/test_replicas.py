"""Two tritonserver replicas sharing one cache: a real Milvus server and a real S3-protocol server, on loopback."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import MILVUS_PORTS

from voltacache.serving.client import Client
from voltacache.serving.deploy import CacheSettings, deploy
from voltacache.serving.server import TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.milvus, pytest.mark.s3]  # two tritonservers of its own


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory, new_port):
    binary = shutil.which("milvus-server") or str(Path(sys.executable).parent / "milvus-server")
    data = tmp_path_factory.mktemp("milvus")
    port = new_port()
    args = [binary, "--data", str(data), "--proxy-port", str(port)]
    for name in MILVUS_PORTS:
        args += [f"--{name}-port", str(new_port())]
    log = open(data / "milvus.log", "wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    from pymilvus import MilvusClient

    deadline = time.monotonic() + 180
    while True:
        try:
            MilvusClient(uri, timeout=5).list_collections()
            break
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"milvus-server did not start; see {data / 'milvus.log'}") from None
            time.sleep(1)
    yield uri
    # the wrapper starts `milvus run standalone` as its child: stop the whole group
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_result_through_replica_a_is_a_hit_on_replica_b(engines_dir, milvus_server, s3_endpoint, tmp_path, new_port):
    import boto3

    bucket = "voltacache-replicas"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    settings = CacheSettings(index=milvus_server, blob_store=f"s3://{bucket}/blobs")
    repos = [deploy(engines_dir, tmp_path / name, cache=settings) for name in ("a", "b")]
    ports = lambda: dict(http_port=new_port(), grpc_port=new_port(), metrics_port=new_port())  # noqa: E731
    with TritonServer(repos[0], **ports()) as a, TritonServer(repos[1], **ports()) as b:
        first = Client(a.grpc_url).generate("a lighthouse on a cliff", steps=6, seed=5, scheduler="ddim")
        second = Client(b.grpc_url).generate("a lighthouse on a cliff", steps=6, seed=5, scheduler="ddim")
        refreshed = Client(b.grpc_url).generate(
            "a lighthouse on a cliff", steps=6, seed=5, scheduler="ddim", cache_mode="refresh"
        )
        off = Client(a.grpc_url).generate(
            "a lighthouse on a cliff", steps=6, seed=5, scheduler="ddim", cache_mode="off"
        )
        # either replica answers a search of the shared cache, with what replica a stored
        searched = [Client(r.grpc_url).search("a lighthouse on a cliff", top=1) for r in (a, b)]
    assert (first.cache, first.steps_computed) == ("miss", 6)
    assert (second.cache, second.steps_computed, second.unet_deep_calls) == ("semantic", 0, 0)
    assert second.similarity > 0.999 and second.seed == 5
    assert np.array_equal(first.images, second.images)
    assert (refreshed.cache, refreshed.steps_computed) == ("miss", 6)
    assert (off.cache, off.steps_computed) == ("off", 6)
    for (found,) in searched:
        assert found.prompt == "a lighthouse on a cliff" and np.array_equal(found.image, first.images[0])
