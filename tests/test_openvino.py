"""OpenVINO as an engine backend (a runner, a builder and a row of runtime.backends): parity with ONNX Runtime
at f32, bf16 within a measured bound and never mistaken for fp32, `--backend auto` chosen by timing, engines
refused on a CPU that lacks what they were built for, LoRA refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import PROMPT, cli, one_error_line

from voltacache.errors import RebuildNeeded
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.runtime import engines as engines_module
from voltacache.runtime.cpu import has_bf16
from voltacache.runtime.engines import load_engines
from voltacache.runtime.manifests import read_engine_manifest
from voltacache.runtime.runners import OpenVinoRunner
from voltacache.specs import COMPONENTS

REQUEST = dict(steps=8, seed=3, scheduler="ddim")
BF16_BOUND = 0.1  # bf16 against fp32 on random inputs, relative (measured on the tiny model: about 0.04)


def test_openvino_engines_equal_onnxruntime_at_f32(engines_openvino, engines_dir):
    manifest = read_engine_manifest(engines_openvino)
    assert manifest.backend == "openvino" and manifest.inference_precision == "f32"
    assert set(manifest.files) == set(COMPONENTS) and all(f.endswith(".xml") for f in manifest.files.values())
    assert all(manifest.report[name]["error"] <= 1e-4 for name in COMPONENTS), manifest.report  # measured at build
    loaded = load_engines(engines_openvino)
    assert isinstance(loaded.runners["unet_deep"], OpenVinoRunner)
    ov = StableDiffusion.from_engines(engines_openvino)(PROMPT, **REQUEST).images[0]
    ort = StableDiffusion.from_engines(engines_dir)(PROMPT, **REQUEST).images[0]
    assert np.abs(np.asarray(ov, int) - np.asarray(ort, int)).max() <= 1


@pytest.mark.skipif(not has_bf16(), reason="this CPU has no bf16 instructions (AVX-512 BF16 or AMX)")
def test_a_bf16_export_runs_on_the_bf16_units_within_its_measured_bound(onnx_bf16, onnx_fp32, tmp_path):
    result = cli("build", "--onnx", onnx_bf16, "--out", tmp_path / "bf16", "--backend", "openvino")
    assert result.exit_code == 0, result.output
    manifest = read_engine_manifest(tmp_path / "bf16")
    assert manifest.inference_precision == "bf16" and manifest.export.precision == "bf16"
    errors = [manifest.report[name]["error"] for name in COMPONENTS]
    assert all(e <= BF16_BOUND for e in errors) and max(errors) > 1e-4, errors  # computed in bf16, bounded
    # and the build says so, with the figure it recorded
    said = "bf16 against fp32 (max abs error relative to max(1, |output|), random inputs): text_encoder"
    assert f"{said} {errors[0]:.2e}" in result.stderr
    # its images are never taken for fp32 ones: the export's fingerprint (the caches' scope) says bf16
    bf16 = read_engine_manifest(tmp_path / "bf16").export.fingerprint
    assert bf16 != json.loads((onnx_fp32 / "manifest.json").read_text())["fingerprint"]
    image = StableDiffusion.from_engines(tmp_path / "bf16")(PROMPT, **REQUEST).images[0]
    assert np.asarray(image).shape == (64, 64, 3)
    # ONNX Runtime has no bf16 kernels here: refused in one line, naming the backend that builds it
    result = cli("build", "--onnx", onnx_bf16, "--out", tmp_path / "ort", "--backend", "onnxruntime")
    one_error_line(result, 2, "--backend onnxruntime: builds fp16, fp32, int8 exports, not bf16", "openvino")


def test_bf16_engines_are_refused_on_a_cpu_without_bf16(engines_openvino, tmp_path, monkeypatch):
    copy = shutil.copytree(engines_openvino, tmp_path / "engines")
    data = json.loads((copy / "engines.json").read_text())
    data["inference_precision"] = "bf16"
    (copy / "engines.json").write_text(json.dumps(data))
    monkeypatch.setattr(engines_module, "has_bf16", lambda: False)
    with pytest.raises(RebuildNeeded, match="built for bf16, and this CPU .* has no bf16 instructions"):
        load_engines(copy)


def test_auto_times_the_backends_that_run_here_and_records_why(onnx_fp32, tmp_path):
    result = cli("build", "--onnx", onnx_fp32, "--out", tmp_path / "auto")
    assert result.exit_code == 0, result.output
    manifest = read_engine_manifest(tmp_path / "auto")
    timed = manifest.selection["seconds"]
    assert set(timed) == {"openvino", "onnxruntime"}  # TensorRT is not here: the CPU backends are timed
    assert manifest.backend == min(timed, key=timed.get) == manifest.selection["chosen"]
    assert manifest.selection["cpu"]["model"] and "flags" in manifest.selection["cpu"]
    assert f"backend: {manifest.backend} (fastest on one unet_deep call on" in result.stderr


def test_a_lora_on_openvino_engines_is_refused_in_one_line(engines_openvino, lora_files, tmp_path):
    args = ["generate", PROMPT, "--engines", engines_openvino, "--lora", lora_files["style"], "-o", tmp_path / "a.png"]
    one_error_line(cli(*args), 2, "lora: openvino engines cannot swap their weights")
    assert not (tmp_path / "a.png").exists()
