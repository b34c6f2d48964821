import json
import shutil

import numpy as np
import pytest

from voltacache.build import (
    ENGINE_MANIFEST,
    RebuildNeeded,
    build_engines,
    choose_backend,
    load_engines,
    tensorrt_available,
)
from voltacache.errors import VoltacacheError
from voltacache.specs import COMPONENTS, UNET_DEEP

TRT_OK, TRT_WHY = tensorrt_available()


def copy_engines(engines_dir, tmp_path):
    return shutil.copytree(engines_dir, tmp_path / "engines")


def test_onnxruntime_manifest(engines_dir, onnx_fp32):
    manifest = json.loads((engines_dir / ENGINE_MANIFEST).read_text())
    assert manifest["backend"] == "onnxruntime"
    assert manifest["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert manifest["versions"]["onnxruntime"]
    assert set(manifest["files"]) == set(COMPONENTS)
    for name in COMPONENTS:
        assert (engines_dir / manifest["files"][name]).is_file()
    assert manifest["export"]["components"][UNET_DEEP]["inputs"][0]["shape"] == [2, 4, 8, 8]


def test_auto_says_which_backend_and_why():
    backend, reason = choose_backend("auto")
    assert backend == ("tensorrt" if TRT_OK else "onnxruntime")
    assert reason == TRT_WHY and reason


@pytest.mark.skipif(TRT_OK, reason="TensorRT and a GPU are present here")
def test_tensorrt_refused_with_reason_where_absent():
    with pytest.raises(VoltacacheError, match="--backend tensorrt: "):
        choose_backend("tensorrt")


@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT path needs tensorrt and a GPU: {TRT_WHY}")
def test_tensorrt_engines_match_onnxruntime(onnx_fp32, engines_dir, tmp_path):
    trt_dir = tmp_path / "trt"
    manifest = build_engines(onnx_fp32, trt_dir, backend="tensorrt")  # runs polygraphy's comparator
    assert manifest["versions"]["compute_capability"]
    trt = load_engines(trt_dir, cuda_graph=True).runners
    ort = load_engines(engines_dir).runners
    feeds = {
        t.name: np.random.default_rng(0).standard_normal(t.shape).astype(t.dtype) for t in trt[UNET_DEEP].spec.inputs
    }
    a, b = trt[UNET_DEEP].infer(feeds), ort[UNET_DEEP].infer(feeds)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=2e-2, rtol=2e-2)


def test_engines_from_another_runtime_version_are_refused(engines_dir, tmp_path):
    copy = copy_engines(engines_dir, tmp_path)
    manifest = json.loads((copy / ENGINE_MANIFEST).read_text())
    manifest["versions"]["onnxruntime"] = "0.0.1"
    (copy / ENGINE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RebuildNeeded, match="onnxruntime 0.0.1.*rebuild"):
        load_engines(copy)


def test_changed_onnx_is_refused(onnx_fp32, tmp_path):
    onnx_copy = shutil.copytree(onnx_fp32, tmp_path / "onnx")
    engines = tmp_path / "engines"
    build_engines(onnx_copy, engines, backend="onnxruntime")
    load_engines(engines)
    with open(onnx_copy / "vae_decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(RebuildNeeded, match="changed since the build; rebuild"):
        load_engines(engines)


def test_corrupt_engine_reported_by_name(engines_dir, tmp_path):
    copy = copy_engines(engines_dir, tmp_path)
    (copy / "unet_shallow.onnx").write_bytes(b"not a model")
    with pytest.raises(VoltacacheError, match="unet_shallow.onnx: ONNX Runtime cannot load it"):
        load_engines(copy)


def test_corrupt_manifest_reported(engines_dir, tmp_path):
    copy = copy_engines(engines_dir, tmp_path)
    (copy / ENGINE_MANIFEST).write_text("{")
    with pytest.raises(VoltacacheError, match="engines.json: corrupt engine manifest"):
        load_engines(copy)
