import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from voltacache import export
from voltacache.errors import ExportError
from voltacache.export import ExportOptions, export_model, fp16_overflows, model_fingerprint, read_manifest
from voltacache.specs import COMPONENTS, UNET_DEEP, UNET_SHALLOW


@pytest.fixture(scope="module")
def onnx_fp16_branch0(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp16_b0_o18"
    export_model(tiny_dir, out, ExportOptions(precision="fp16", opset=18, deepcache_branch="0"))
    return out


def graph_ops(path):
    model = onnx.load(str(path))
    return [n.op_type for n in model.graph.node], model


def test_manifest_describes_every_file(onnx_fp32, tiny_dir):
    manifest = read_manifest(onnx_fp32)
    assert manifest["fingerprint"] == model_fingerprint(tiny_dir)
    assert {"torch", "diffusers", "onnx", "onnxruntime"} <= manifest["versions"].keys()
    for name in COMPONENTS:
        entry = manifest["components"][name]
        model = onnx.load(str(onnx_fp32 / entry["file"]))
        onnx.checker.check_model(model, full_check=True)
        declared = {t["name"]: tuple(t["shape"]) for t in entry["inputs"] + entry["outputs"]}
        for value in [*model.graph.input, *model.graph.output]:
            assert tuple(d.dim_value for d in value.type.tensor_type.shape.dim) == declared[value.name]
        assert entry["max_error"] <= entry["tolerance"] == 1e-4
        assert entry["tensorrt_lint"]["ok"], entry["tensorrt_lint"]


def test_opset_23_fuses_every_attention(onnx_fp32):
    ops, _ = graph_ops(onnx_fp32 / "unet_deep.onnx")
    # tiny U-Net: 10 transformer blocks, each with self- and cross-attention
    assert ops.count("Attention") == 20 and "Softmax" not in ops
    assert read_manifest(onnx_fp32)["components"][UNET_DEEP]["attention_nodes"] == 20


def test_split_matches_unsplit(onnx_fp32):
    components = read_manifest(onnx_fp32)["components"]
    for name in (UNET_DEEP, UNET_SHALLOW):
        assert components[name]["unsplit_error"]["torch"] == 0.0
        assert components[name]["unsplit_error"]["onnx"] <= 1e-4


def test_fp16_opset18_branch0(onnx_fp16_branch0):
    manifest = read_manifest(onnx_fp16_branch0)
    assert manifest["precision"] == "fp16" and manifest["deepcache_branch"] == "0"
    ops, model = graph_ops(onnx_fp16_branch0 / "unet_deep.onnx")
    assert "Attention" not in ops and ops.count("Softmax") == 20  # unfused: TensorRT fuses it itself
    weights = [t for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert sum(t.data_type == TensorProto.FLOAT16 for t in weights) > 0.9 * len(weights)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # I/O stays fp32
    shallow = manifest["components"][UNET_SHALLOW]
    assert shallow["inputs"][-1]["shape"] == [2, 32, 8, 8]
    assert shallow["max_error"] <= 5e-2 and shallow["fp16_overflows"] == []
    # branch 0's shallow graph is a fraction of the deep one
    assert len(graph_ops(onnx_fp16_branch0 / "unet_shallow.onnx")[0]) < len(ops) / 4


def test_export_fails_when_onnx_disagrees(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(export.TOLERANCE, "fp32", 0.0)
    with pytest.raises(ExportError, match="text_encoder.onnx: ONNX Runtime differs from PyTorch"):
        export_model(tiny_dir, tmp_path, ExportOptions(precision="fp32"))


def test_bad_options(tiny_dir, tmp_path):
    with pytest.raises(ExportError, match="--precision"):
        export_model(tiny_dir, tmp_path, ExportOptions(precision="int4"))
    with pytest.raises(ExportError, match="multiples of 64"):
        export_model(tiny_dir, tmp_path, ExportOptions(height=100))


def test_fp16_overflow_is_detected(tmp_path):
    nodes = [
        helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["h", "k"], ["m"]),
        helper.make_node("Cast", ["m"], ["y"], to=TensorProto.FLOAT),
    ]
    k = helper.make_tensor("k", TensorProto.FLOAT16, [1], np.array([1000], np.float16).view(np.uint16).tolist())
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [k],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    assert fp16_overflows(path, {"x": np.array([1.0, 2.0], np.float32)}) == []
    assert set(fp16_overflows(path, {"x": np.array([1.0, 100.0], np.float32)})) == {"m", "y"}


def test_fingerprint_changes_with_weights(tiny_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_dir)
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(tiny_dir)


def test_cli_export_prints_lint(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from voltacache.cli import app

    result = CliRunner().invoke(
        app, ["export", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--precision", "fp32", "--height", "96"]
    )
    assert result.exit_code == 1 and "multiples of 64" in result.output
