"""Session-wide fixtures: one tiny model per test session, shared by every test that needs one."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a test that reaches for the hub fails instead of hanging

# A test that uses one of these fixtures (directly or through another fixture) starts that server:
# it gets the marker (triton, milvus or s3), and `make test-fast` leaves it out.
# Tests that start a server of their own carry the marker explicitly (pytestmark in their module).
SERVER_FIXTURES = {"triton": "triton", "milvus_server": "milvus", "s3_endpoint": "s3"}
# The slowest tests that start no server, each 2 s or more on 2 cores (--durations, the machine shared
# with other jobs): marked `slow`, so `make test-fast` stays under two minutes; `make test` runs them.
# Listed here by node id (a parametrized test: all its cases) rather than in their modules, which
# change under other hands; a renamed test drops out of this list silently, so rename it here too.
SLOW = {
    "tests/test_export.py::test_fp16_opset18_branch0": "a second full export, fp16 at opset 18: ~40",
    "tests/shapes/test_shipped_model.py::test_images_follow_their_captions": "4.5",
    "tests/test_export.py::test_export_fails_when_onnx_disagrees": "3.5",
    "tests/cache/test_store.py::test_eviction_scans_once_per_low_water_gap_and_pages_past_a_query_window": "3.2",
    "tests/cache/test_cli_cache.py::test_generate_reports_the_cache_layer": "3.1",
    "tests/cache/test_availability.py::test_unreachable_server_is_reported_within_seconds": "3.0 (silent)",
    "tests/test_request.py::test_client_and_light_models_import_without_torch": "2.5, a fresh Python",
    "tests/cache/test_cli_cache.py::test_cache_stats_purge_clear": "2.4",
    "tests/test_checkpoint.py::test_single_file_against_shipped_sd15_configs_reports_shape_mismatch": "2.4",
    "tests/cache/test_cli_maintenance.py::test_an_index_with_several_caches_needs_embedder": "2.4",
    "tests/cache/test_cli_maintenance.py::test_repair_purge_blobs_and_clear_force": "2.4",
    "tests/cache/test_cli_maintenance.py::test_corrupt_index_error_is_one_line_on_the_real_stderr": "2.1",
    "tests/test_cli.py::test_init_tiny_writes_loadable_pipeline": "2.1",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in SERVER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
        if item.nodeid.split("[")[0] in SLOW:
            item.add_marker("slow")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from voltacache.presets import write_pipeline

    return write_pipeline(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    from voltacache.checkpoint import load_pipeline

    return load_pipeline(tiny_dir)


@pytest.fixture(scope="session")
def onnx_fp32(tiny_dir, tmp_path_factory):
    """The tiny model exported once per session in fp32 (what a CPU serves), block split, opset 23."""
    from voltacache.export import ExportOptions, export_model

    out = tmp_path_factory.mktemp("onnx") / "fp32"
    export_model(tiny_dir, out, ExportOptions(precision="fp32"))
    return out


@pytest.fixture(scope="session")
def engines_dir(onnx_fp32, tmp_path_factory):
    """ONNX Runtime engines built once per session from the fp32 export."""
    from voltacache.build import build_engines

    out = tmp_path_factory.mktemp("engines") / "ort"
    build_engines(onnx_fp32, out, backend="onnxruntime")
    return out


@pytest.fixture(scope="session")
def sd(engines_dir):
    from voltacache.pipeline import StableDiffusion

    return StableDiffusion.from_engines(engines_dir)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def triton_repo(engines_dir, tmp_path_factory):
    from voltacache.serving.deploy import deploy

    return deploy(engines_dir, tmp_path_factory.mktemp("triton") / "repo")


@pytest.fixture(scope="session")
def triton(triton_repo, tmp_path_factory):
    """One real tritonserver (the pip-bundled CPU build) per test session, on loopback."""
    from voltacache.serving.server import TritonServer

    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    with TritonServer(
        triton_repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), log_file=log
    ) as server:
        yield server


@pytest.fixture
def ports():
    """Three free loopback ports for a server of the test's own."""
    return dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-protocol server (moto_server) on loopback, with dummy credentials for this session."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    server = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    process = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def new_port():
    """A function that returns a free loopback port."""
    return free_port
