"""Session-wide fixtures: one tiny model per test session, shared by every test that needs one."""

from __future__ import annotations

import os

import pytest
from helpers import OTHER_MODELS_PROMPT

from voltacache.benchmark import free_port

os.environ["HF_HUB_OFFLINE"] = "1"  # a test that reaches for the hub fails instead of hanging

# A test that uses one of these fixtures (directly or through another fixture) starts that server:
# it gets the marker (triton, milvus or s3), and `make test-fast` leaves it out.
# Tests that start a server of their own carry the marker explicitly (pytestmark in their module).
SERVER_FIXTURES = {"triton": "triton", "cached_server": "triton", "milvus_server": "milvus", "s3_endpoint": "s3"}
# The slowest tests that start no server (2 s or more here) carry `@pytest.mark.slow` in their modules:
# `make test-fast` leaves them out to stay under two minutes; `make test` runs them.


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in SERVER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from voltacache.compile.presets import write_pipeline

    return write_pipeline(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    from voltacache.compile.checkpoint import load_pipeline

    return load_pipeline(tiny_dir)


@pytest.fixture(scope="session")
def onnx_fp32(tiny_dir, tmp_path_factory):
    """The tiny model exported once per session in fp32 (what a CPU serves), block split, opset 23."""
    from voltacache.compile.export import export_model
    from voltacache.compile.options import ExportOptions

    out = tmp_path_factory.mktemp("onnx") / "fp32"
    export_model(tiny_dir, out, ExportOptions(precision="fp32"))
    return out


CALIBRATION_PROMPTS = ("a red square on a blue background", "a photo of an astronaut riding a horse")


@pytest.fixture(scope="session")
def onnx_fp16_branch0(tiny_dir, tmp_path_factory):
    """The tiny model in fp16 (the export's default precision), opset 18, DeepCache split at branch 0, prompts of
    one chunk (a static context): the other side of every export option onnx_fp32 takes."""
    from voltacache.compile.export import export_model
    from voltacache.compile.options import ExportOptions

    out = tmp_path_factory.mktemp("onnx") / "fp16_b0_o18"
    export_model(tiny_dir, out, ExportOptions(precision="fp16", opset=18, deepcache_branch="0", max_prompt_chunks=1))
    return out


@pytest.fixture(scope="session")
def engines_dir(onnx_fp32, tmp_path_factory):
    """ONNX Runtime engines built once per session from the fp32 export."""
    from voltacache.compile.build import build_engines
    from voltacache.pipeline.calibrate import calibrate

    out = tmp_path_factory.mktemp("engines") / "ort"
    build_engines(onnx_fp32, out, backend="onnxruntime")
    # calibrated DeepCache schedules for 12 steps at N = 3, so that in process and served alike can run them
    calibrate(out, CALIBRATION_PROMPTS, steps=(12,), intervals=(3,), seed=0)
    return out


def tiny_family(tmp_path_factory, preset: str):
    """(model folder, engines folder) of a tiny preset of another family, exported in fp32 and built once."""
    from voltacache.compile.build import build_engines
    from voltacache.compile.export import export_model
    from voltacache.compile.options import ExportOptions
    from voltacache.compile.presets import write_pipeline

    root = tmp_path_factory.mktemp(preset)
    model = write_pipeline(root / "model", preset, seed=0)
    export_model(model, root / "onnx", ExportOptions(precision="fp32"))
    build_engines(root / "onnx", root / "engines", backend="onnxruntime")
    return model, root / "engines"


SIZES = ((64, 64), (64, 128), (128, 64))  # (height, width): the tiny model's own, a landscape and a portrait


@pytest.fixture(scope="session")
def sizes_engines(tiny_dir, tmp_path_factory):
    """ONNX Runtime engines of one export serving the tiny model at SIZES (export --sizes)."""
    from voltacache.compile.build import build_engines
    from voltacache.compile.export import export_model
    from voltacache.compile.options import ExportOptions

    root = tmp_path_factory.mktemp("sizes")
    export_model(tiny_dir, root / "onnx", ExportOptions(precision="fp32", sizes=SIZES))
    build_engines(root / "onnx", root / "engines", backend="onnxruntime")
    return root / "engines"


@pytest.fixture(scope="session")
def controlnet_dirs(tmp_path_factory):
    """Two tiny ControlNets of the tiny model's topology (random weights: residuals that change the image)."""
    from voltacache.compile.controlnets import write_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return {name: write_controlnet(root / name, "controlnet-tiny", seed) for name, seed in (("canny", 0), ("depth", 1))}


@pytest.fixture(scope="session")
def controlled(tiny_dir, controlnet_dirs, tmp_path_factory):
    """The tiny model exported with both ControlNets (fp32), built for ONNX Runtime."""
    from voltacache.compile.build import build_engines
    from voltacache.compile.export import export_model
    from voltacache.compile.options import ExportOptions

    root = tmp_path_factory.mktemp("controlled")
    options = ExportOptions(precision="fp32", controlnets=tuple(controlnet_dirs.items()))
    export_model(tiny_dir, root / "onnx", options)
    build_engines(root / "onnx", root / "engines", backend="onnxruntime")
    return root / "engines"


@pytest.fixture(scope="session")
def sdxl_tiny(tmp_path_factory):
    """SDXL's topology at tiny widths: two text encoders, size conditioning, a 3-level U-Net."""
    return tiny_family(tmp_path_factory, "sdxl-tiny")


@pytest.fixture(scope="session")
def sd2_tiny(tmp_path_factory):
    """SD 2.x at tiny widths: v-prediction, an OpenCLIP-style text encoder, linear-projection attention."""
    return tiny_family(tmp_path_factory, "sd2-tiny")


@pytest.fixture(scope="session")
def sd(engines_dir):
    from voltacache.pipeline.stable_diffusion import StableDiffusion

    return StableDiffusion.from_engines(engines_dir)


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


@pytest.fixture(scope="session")
def lora_files(tiny_pipe, tmp_path_factory):
    """Two LoRAs for the tiny model (U-Net and text encoder layers), the first also in kohya's layout."""
    from helpers import write_lora

    root = tmp_path_factory.mktemp("loras")
    return {
        "style": write_lora(tiny_pipe, root / "style.safetensors", seed=1),
        "style_kohya": write_lora(tiny_pipe, root / "style_kohya.safetensors", seed=1, kohya=True),
        "other": write_lora(tiny_pipe, root / "other.safetensors", seed=2, rank=2, alpha=2, text_encoder=False),
    }


@pytest.fixture(scope="session")
def cached_server(engines_dir, lora_files, tmp_path_factory):
    """A tritonserver whose deployment keeps a cache (the sentence embedder on a milvus-lite file) and
    registers LoRAs (`style` and `other` of lora_files). Before it starts, the index is given one entry
    of another model, which this one never serves nor shows."""
    import numpy as np

    from voltacache.cache.embedders import MiniLMEmbedder
    from voltacache.cache.layers import to_bytes
    from voltacache.cache.store import CacheStore, scope_key
    from voltacache.serving.deploy import CacheSettings, deploy
    from voltacache.serving.server import TritonServer

    root = tmp_path_factory.mktemp("cache-serving")
    settings = CacheSettings(index=str(root / "cache.db"), embedder="minilm", max_entries=1000)
    with CacheStore(settings.index, root / "cache-blobs", dim=MiniLMEmbedder.dim, embedder="minilm") as store:
        vector = MiniLMEmbedder().embed(OTHER_MODELS_PROMPT)
        image = to_bytes(np.zeros((1, 8, 8, 3), np.uint8))
        store.put_many(
            [
                dict(
                    vector=vector,
                    scope=scope_key("another"),
                    kind="image",
                    payload=image,
                    model="another",
                    prompt=OTHER_MODELS_PROMPT,
                )
            ]
        )
    from voltacache.pipeline.lora import LoraFile

    loras = {name: LoraFile.open(name, lora_files[name]) for name in ("style", "other")}
    repo = deploy(engines_dir, root / "repo", cache=settings, loras=loras)
    log = root / "tritonserver.log"
    with TritonServer(
        repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), log_file=log
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


@pytest.fixture(scope="session")
def engines_openvino(onnx_fp32, tmp_path_factory):
    """OpenVINO engines (f32) of the same fp32 export as engines_dir."""
    from voltacache.compile.build import build_engines

    out = tmp_path_factory.mktemp("engines") / "openvino"
    build_engines(onnx_fp32, out, backend="openvino")
    return out


@pytest.fixture(scope="session")
def onnx_bf16(tiny_dir, tmp_path_factory):
    """The tiny model exported for bf16 (fp32 graphs, run on the CPU's bf16 units)."""
    from voltacache.compile.export import export_model
    from voltacache.compile.options import ExportOptions

    out = tmp_path_factory.mktemp("onnx") / "bf16"
    export_model(tiny_dir, out, ExportOptions(precision="bf16"))
    return out
