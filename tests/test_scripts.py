"""The measuring scripts run at HEAD (on the tiny model, in seconds) and write where they are told: their
results carry the CPU model and its matrix flags, and nothing lands in docs/ unless asked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_cpu_engines_runs_on_the_tiny_model(engines_dir, engines_openvino, tiny_dir, tmp_path):
    out = tmp_path / "cpu.json"
    docs = sorted((ROOT / "docs" / "results").iterdir())
    command = [sys.executable, str(ROOT / "scripts" / "bench_cpu_engines.py"), "--engines", f"ort={engines_dir}"]
    command += ["--engines", f"ov={engines_openvino}", "--model", str(tiny_dir), "--steps", "2", "--repeats", "1"]
    command += ["--gemm-repeats", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["cpu"] and isinstance(data["machine"]["cpu_flags"], list)
    assert [e["backend"] for e in data["engines"]] == ["onnxruntime", "openvino"]
    for engines in data["engines"]:
        assert engines["seconds_per_call"]["unet_deep"] > 0 and engines["seconds_per_image"]["N=3"]["seconds"] > 0
        assert 0 < engines["seconds_per_image"]["N=3"]["vae_share"] < 1
        assert engines["unet_deep_gops"] > 0 and engines["unet_floor_share"] > 0  # every MatMul and Attention
    assert {"onnxruntime fp32", "onnxruntime int8", "openvino f32"} <= set(data["gemm_gops_per_s"])
    assert data["pytorch"]["diffusers"] > 0
    assert sorted((ROOT / "docs" / "results").iterdir()) == docs


def test_no_script_writes_into_docs_by_default():
    """A run by hand writes to build/: make bench (scripts/bench.sh) names docs/ when it updates them."""
    import re

    for script in sorted((ROOT / "scripts").glob("*.py")):
        for line in script.read_text().splitlines():
            if re.search(r'(default=Path\(|Path\(f)"docs/', line):
                assert "results" in line and "--sd15-results" in line, (script.name, line)  # an input it reads


@pytest.mark.slow
def test_bench_prompt_chunks_runs_on_the_tiny_model(engines_dir, onnx_fp16_branch0, tmp_path):
    from voltacache.compile.build import build_engines

    build_engines(onnx_fp16_branch0, tmp_path / "static", backend="onnxruntime")  # one chunk: a static context
    out = tmp_path / "chunks.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_prompt_chunks.py"), "--static", str(tmp_path / "static")]
    command += ["--dynamic", str(engines_dir), "--steps", "2", "--repeats", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["cpu"]
    assert set(data["seconds_per_image"]) == {"static, 1 chunk", *(f"dynamic, {k} chunk(s)" for k in (1, 2, 4))}
    assert all(row["median_s"] > 0 for row in data["unet_deep_call"].values())


@pytest.mark.slow
def test_bench_sizes_runs_on_the_tiny_model(engines_dir, sizes_engines, tmp_path):
    out = tmp_path / "sizes.json"  # no --figure: matplotlib is not a test dependency
    command = [sys.executable, str(ROOT / "scripts" / "bench_sizes.py"), "--multi", str(sizes_engines)]
    command += ["--single", str(engines_dir), "--steps", "2", "--repeats", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["cpu"] and list(data["sizes"]) == ["64x64"]
    assert data["sizes"]["64x64"]["seconds_per_image"]["several sizes"]["median_s"] > 0
    assert len(data["exports"]) == 2
    # a one-size folder given as --multi is refused, naming it
    command = [sys.executable, str(ROOT / "scripts" / "bench_sizes.py"), "--multi", str(engines_dir)]
    result = subprocess.run(command + ["--single", str(engines_dir), "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2 and "engines of one size" in result.stderr


@pytest.mark.slow
def test_bench_controlnet_runs_on_the_tiny_model(tiny_dir, controlnet_dirs, controlled, engines_dir, tmp_path):
    out = tmp_path / "controlnet.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_controlnet.py"), "--model", str(tiny_dir)]
    command += [
        "--controlnet",
        str(controlnet_dirs["canny"]),
        "--engines",
        str(controlled),
        "--plain",
        str(engines_dir),
    ]
    command += ["--steps", "4", "--interval", "2", "--repeats", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["cpu"] and data["seconds_per_image"]["voltacache N=2 reused"]["median_s"] > 0
    assert data["controlnet_share"]["N=2 reused"]["controlnet_calls"] == 2
    assert data["controlnet_share"]["N=2 fresh"]["controlnet_calls"] == 4
    assert data["uncontrolled"]["max_level_difference"] <= 1
