"""INT8 U-Nets and VAE decoder: calibrated QDQ graphs that ONNX Runtime runs, close to fp32; the manifest."""

import math
import shutil

import numpy as np
import onnx
import pytest
from helpers import cli, one_error_line

from voltacache.compile.build import build_engines
from voltacache.compile.export import export_model
from voltacache.compile.options import Calibration, ExportOptions
from voltacache.compile.quantize import QUANTIZED_OPS, outer_convolutions
from voltacache.errors import RebuildNeeded
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.runtime.backends import BACKENDS
from voltacache.runtime.engines import load_engines
from voltacache.runtime.manifests import read_manifest
from voltacache.specs import TEXT_ENCODER, UNET_DEEP, UNET_SHALLOW, VAE_DECODER, VAE_ENCODER

pytestmark = pytest.mark.slow  # an export and a calibration of their own
CALIBRATION = Calibration(prompts=("a red circle on a blue background", "a photo of a cat"), steps=6)
# Measured on the tiny random model (tests/test_quantize.py, 20 DDIM steps): 33-44 dB at N=1 and N=3;
# asserted with a margin. The trained shapes model's quality is in docs/benchmarks.md.
MIN_PSNR_DB = 28.0
TRT_OK, TRT_WHY = BACKENDS["tensorrt"].available()


@pytest.fixture(scope="module")
def onnx_int8(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "int8"
    export_model(tiny_dir, out, ExportOptions(precision="int8", calibration=CALIBRATION))
    return out


@pytest.fixture(scope="module")
def engines_int8(onnx_int8, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "int8"
    build_engines(onnx_int8, out, backend="onnxruntime")
    return out


def ops(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def psnr(a, b):
    mse = ((np.asarray(a, float) - np.asarray(b, float)) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_the_unets_and_the_decoder_are_quantized_and_their_outer_convolutions_stay_fp32(onnx_int8):
    for name in (UNET_DEEP, UNET_SHALLOW, VAE_DECODER):
        graph = onnx.load(str(onnx_int8 / f"{name}.onnx"), load_external_data=False).graph
        kinds = [n.op_type for n in graph.node]
        assert kinds.count("QuantizeLinear") > 10 and kinds.count("DequantizeLinear") > 10
        made_by = {out: n.op_type for n in graph.node for out in n.output}
        convs = [n for n in graph.node if n.op_type == "Conv"]
        quantized = [n for n in convs if made_by.get(n.input[1]) == "DequantizeLinear"]
        assert len(quantized) == len(convs) - 2  # every Conv but conv_in and conv_out has int8 weights
        outer = outer_convolutions(onnx.load(str(onnx_int8 / f"{name}.onnx"), load_external_data=False), name)
        assert all(made_by.get(n.input[1]) != "DequantizeLinear" for n in convs if n.name in outer.values())
        # only Conv, MatMul and Gemm hold int8 weights: normalizations and the fused attention stay fp32
        weights = {i.name for i in graph.initializer}
        int8_weights = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
        holders = {n.op_type for n in graph.node if int8_weights & set(n.input)}
        assert holders <= set(QUANTIZED_OPS) and "Conv" in holders
    for name in (TEXT_ENCODER, VAE_ENCODER):
        assert "QuantizeLinear" not in ops(onnx_int8 / f"{name}.onnx")


def test_manifest_records_precision_and_calibration(onnx_int8, onnx_fp32):
    int8, fp32 = read_manifest(onnx_int8), read_manifest(onnx_fp32)
    assert int8.precision == "int8" and int8.calibration["id"] == CALIBRATION.id
    assert int8.calibration["prompts"] == list(CALIBRATION.prompts) and int8.calibration["steps"] == 6
    assert int8.model_fingerprint == fp32.model_fingerprint
    assert int8.fingerprint != fp32.fingerprint  # the cache never serves one's images for the other
    assert int8.calibration["quantized"] == [UNET_DEEP, UNET_SHALLOW, VAE_DECODER]
    for name in (UNET_DEEP, UNET_SHALLOW, VAE_DECODER):
        entry = int8.components[name]
        assert entry.precision == "int8" and 0 < entry.report["int8_error"] < 0.2
        assert entry.report["tensorrt_lint"]["ok"], entry.report["tensorrt_lint"]
        assert set(entry.report["kept_fp32"]) == {"conv_in", "conv_out"}


@pytest.mark.parametrize("interval", [1, 3])
def test_int8_image_stays_close_to_fp32(engines_int8, engines_dir, interval):
    int8, fp32 = StableDiffusion.from_engines(engines_int8), StableDiffusion.from_engines(engines_dir)
    request = dict(steps=20, seed=7, scheduler="ddim", guidance=5.0, cache_interval=interval)
    for prompt in ("a red circle on a blue background", "a photo of an astronaut riding a horse"):
        a, b = int8(prompt, **request), fp32(prompt, **request)
        assert (a.stats.unet_deep_calls, a.stats.unet_shallow_calls) == (
            b.stats.unet_deep_calls,
            b.stats.unet_shallow_calls,
        )
        assert psnr(a.images[0], b.images[0]) >= MIN_PSNR_DB


def test_engines_refuse_an_export_calibrated_on_another_set(onnx_int8, tiny_dir, tmp_path):
    export = shutil.copytree(onnx_int8, tmp_path / "onnx")
    engines = tmp_path / "engines"
    build_engines(export, engines, backend="onnxruntime")
    other = Calibration(prompts=("a green square on a yellow background",), steps=3)
    export_model(tiny_dir, export, ExportOptions(precision="int8", calibration=other), force=True)
    with pytest.raises(RebuildNeeded, match=f"calibrated on set {CALIBRATION.id}.*calibrated on {other.id}"):
        load_engines(engines)


def test_calibration_options_need_int8(tiny_dir, tmp_path):
    one_error_line(
        cli("export", "--model", tiny_dir, "--out", tmp_path / "o", "--precision", "fp32", "--calibration-steps", "4"),
        2,
        "only with --precision int8",
    )
    one_error_line(
        cli(
            "export",
            "--model",
            tiny_dir,
            "--out",
            tmp_path / "o",
            "--precision",
            "int8",
            "--calibration-prompts",
            tmp_path,
        ),
        2,
        "--calibration-prompts",
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT INT8 path needs tensorrt and a GPU: {TRT_WHY}")
def test_tensorrt_int8_engine_matches_onnxruntime(onnx_int8, tmp_path):
    # explicit quantization: TensorRT takes the QDQ scales, no calibrator; polygraphy compares it with
    # ONNX Runtime's int8 kernels at the int8 tolerance during the build
    manifest = build_engines(onnx_int8, tmp_path / "trt", backend="tensorrt")
    assert manifest.backend == "tensorrt" and manifest.export.precision == "int8"


@pytest.mark.triton
def test_int8_engines_serve_unchanged(engines_int8, tmp_path, ports):
    from voltacache.serving.client import Client
    from voltacache.serving.deploy import deploy
    from voltacache.serving.server import TritonServer

    repo = deploy(engines_int8, tmp_path / "repo")
    request = dict(steps=8, seed=3, scheduler="ddim", cache_interval=3)
    local = StableDiffusion.from_engines(engines_int8)("a red circle on a blue background", **request)
    with TritonServer(repo, **ports) as server:
        served = Client(server.grpc_url).generate("a red circle on a blue background", **request)
    assert np.array_equal(served.images[0], np.asarray(local.images[0]))
    assert served.unet_deep_calls == local.stats.unet_deep_calls == 3
