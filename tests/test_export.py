import json

import numpy as np
import onnx
import pytest
from helpers import cli, one_error_line, snapshot
from onnx import TensorProto, helper

from voltacache.compile import export
from voltacache.compile.export import export_model, fp16_overflows, model_fingerprint
from voltacache.compile.options import ExportOptions, parse_batch_sizes
from voltacache.errors import ExportError, UsageError
from voltacache.runtime.manifests import read_manifest
from voltacache.specs import COMPONENTS, PROMPT_AXIS, PROMPT_TOKENS, ROWS, UNET_DEEP, UNET_SHALLOW


def graph_ops(path):
    model = onnx.load(str(path))
    return [n.op_type for n in model.graph.node], model


def test_manifest_describes_every_file(onnx_fp32, tiny_dir):
    manifest = read_manifest(onnx_fp32)
    assert manifest.model_fingerprint == model_fingerprint(tiny_dir)
    # what the images depend on: the weights and how they were compiled
    assert manifest.fingerprint == ExportOptions(precision="fp32").fingerprint(model_fingerprint(tiny_dir))
    assert manifest.fingerprint != ExportOptions(precision="fp16").fingerprint(model_fingerprint(tiny_dir))
    assert {"torch", "diffusers", "onnx", "onnxruntime"} <= manifest.versions.keys()
    assert manifest.batch == 1 and manifest.batch_sizes == (1, 2, 4, 8)
    # the typed manifest is its file, read and written in one place
    assert manifest.to_json() == json.loads((onnx_fp32 / "manifest.json").read_text())
    for name in COMPONENTS:
        entry = manifest.components[name].to_json()
        assert entry["tensorrt_lint"]["ok"], entry["tensorrt_lint"]  # the prompt axis too: the profiles span it
        model = onnx.load(str(onnx_fp32 / entry["file"]))
        onnx.checker.check_model(model, full_check=True)
        declared = {t["name"]: tuple(t["shape"]) for t in entry["inputs"] + entry["outputs"]}
        for value in [*model.graph.input, *model.graph.output]:
            # the manifest holds the shapes at --batch; the graph leaves the rows dynamic
            # and, past one prompt chunk, the context's prompt axis, declared at one chunk
            rows, *rest = value.type.tensor_type.shape.dim
            prompt = PROMPT_AXIS.get(value.name) if manifest.max_prompt_chunks > 1 else None
            assert rows.dim_param == ROWS
            assert [d.dim_param or d.dim_value for d in rest] == [
                PROMPT_TOKENS if axis == prompt else size for axis, size in enumerate(declared[value.name][1:], 1)
            ]
        assert entry["max_error"] <= entry["tolerance"] == 1e-4
        assert entry["tensorrt_lint"]["ok"], entry["tensorrt_lint"]


def test_opset_23_fuses_every_attention(onnx_fp32):
    ops, _ = graph_ops(onnx_fp32 / "unet_deep.onnx")
    # tiny U-Net: 10 transformer blocks, each with self- and cross-attention
    assert ops.count("Attention") == 20 and "Softmax" not in ops
    assert read_manifest(onnx_fp32).components[UNET_DEEP].report["attention_nodes"] == 20


def test_split_matches_unsplit(onnx_fp32):
    components = read_manifest(onnx_fp32).components
    for name in (UNET_DEEP, UNET_SHALLOW):
        assert components[name].report["unsplit_error"]["torch"] == 0.0
        assert components[name].report["unsplit_error"]["onnx"] <= 1e-4


@pytest.mark.slow
def test_fp16_opset18_branch0(onnx_fp16_branch0):
    manifest = read_manifest(onnx_fp16_branch0)
    assert manifest.precision == "fp16" and manifest.deepcache_branch == "0"
    ops, model = graph_ops(onnx_fp16_branch0 / "unet_deep.onnx")
    assert "Attention" not in ops and ops.count("Softmax") == 20  # unfused: TensorRT fuses it itself
    weights = [t for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert sum(t.data_type == TensorProto.FLOAT16 for t in weights) > 0.9 * len(weights)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # I/O stays fp32
    shallow = manifest.components[UNET_SHALLOW].to_json()
    assert shallow["inputs"][-1]["shape"] == [2, 32, 8, 8]
    assert shallow["max_error"] <= 5e-2 and shallow["fp16_overflows"] == []
    # branch 0's shallow graph is a fraction of the deep one
    assert len(graph_ops(onnx_fp16_branch0 / "unet_shallow.onnx")[0]) < len(ops) / 4
    # fp16 goes through disk in scratch folders inside the staging folder: none is left anywhere
    assert [p.name for p in onnx_fp16_branch0.parent.iterdir()] == [onnx_fp16_branch0.name]
    assert not any(p.name.startswith(("tmp", ".")) or "probe" in p.name for p in onnx_fp16_branch0.iterdir())


@pytest.mark.slow
def test_export_fails_when_onnx_disagrees(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(export.TOLERANCE, "fp32", 0.0)
    with pytest.raises(ExportError, match="text_encoder.onnx: ONNX Runtime differs from PyTorch"):
        export_model(tiny_dir, tmp_path, ExportOptions(precision="fp32"))


def test_bad_options(tiny_dir, tmp_path):
    """Mistakes in what was asked: UsageError (exit 2), found before anything loads."""
    with pytest.raises(UsageError, match="--precision"):
        export_model(tiny_dir, tmp_path, ExportOptions(precision="int4"))
    with pytest.raises(UsageError, match="--opset 17"):
        export_model(tiny_dir, tmp_path, ExportOptions(opset=17))
    for height in (100, 8, 65536):  # not a multiple of 64, too small to halve thrice, beyond any machine's memory
        with pytest.raises(UsageError, match=f"--height {height}: a multiple of 64 pixels from 64 to 4096"):
            export_model(tiny_dir, tmp_path, ExportOptions(height=height))
    with pytest.raises(UsageError, match="--batch-sizes 1,2: use positive multiples of --batch 2"):
        export_model(tiny_dir, tmp_path, ExportOptions(batch=2, batch_sizes=(1, 2)))
    with pytest.raises(UsageError, match="--batch-sizes 0,1"):
        export_model(tiny_dir, tmp_path, ExportOptions(batch_sizes=(1, 0)))


def test_batch_sizes_default_to_multiples_of_the_batch():
    assert ExportOptions().batch_sizes == (1, 2, 4, 8)
    assert ExportOptions(batch=2).batch_sizes == (2, 4, 8, 16)
    assert ExportOptions(batch_sizes=(4, 1, 2, 4)).batch_sizes == (1, 2, 4)  # sorted, unique
    assert parse_batch_sizes("1,2,4,8") == (1, 2, 4, 8)


def test_cli_export_refuses_bad_batch_sizes(tiny_dir, tmp_path):
    for value in ("1,two", "1,,2", ""):
        one_error_line(
            cli("export", "--model", tiny_dir, "--out", tmp_path / "o", "--batch-sizes", value), 2, "--batch-sizes"
        )
    one_error_line(
        cli("export", "--model", tiny_dir, "--out", tmp_path / "o", "--batch", "2", "--batch-sizes", "2,3"),
        2,
        "--batch-sizes 2,3: use positive multiples of --batch 2",
    )
    assert not (tmp_path / "o").exists()


def test_export_from_before_step_batching_is_refused(onnx_fp32, tmp_path):
    import json
    import shutil

    old = shutil.copytree(onnx_fp32, tmp_path / "onnx")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["batch_sizes"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="exported by an older voltacache .*run `voltacache export` again"):
        read_manifest(old)


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


def test_cli_export_refuses_a_side_the_unet_cannot_halve(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from voltacache.cli import app

    result = CliRunner().invoke(
        app, ["export", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--precision", "fp32", "--height", "96"]
    )
    assert result.exit_code == 2 and "--height 96: a multiple of 64 pixels" in result.stderr


def test_cli_export_refuses_earlier_export_without_force(onnx_fp32, tiny_dir, tmp_path):
    import shutil

    out = shutil.copytree(onnx_fp32, tmp_path / "onnx")
    before = snapshot(out)
    result = cli("export", "--model", tiny_dir, "--out", out, "--precision", "fp32")
    one_error_line(result, 2, f"--out {out}: holds an earlier export; pass --force")
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]


def test_cli_export_never_replaces_a_users_folder(tiny_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = cli("export", "--model", tiny_dir, "--out", out, "--force")
    one_error_line(result, 2, f"--out {out}: not an export (no manifest.json in it)")
    assert (out / "notes.txt").read_text() == "mine" and [p.name for p in out.iterdir()] == ["notes.txt"]


def test_cli_export_to_unwritable_out_names_it(tiny_dir, tmp_path):
    (tmp_path / "file").write_text("mine")
    one_error_line(
        cli("export", "--model", tiny_dir, "--out", "/proc/voltacache/onnx"), 2, "--out /proc/voltacache/onnx"
    )
    one_error_line(
        cli("export", "--model", tiny_dir, "--out", tmp_path / "file" / "onnx"), 2, "--out", "Not a directory"
    )
    one_error_line(cli("export", "--model", tiny_dir, "--out", tmp_path / "file"), 2, "--out", "a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["file"]


def test_cli_export_interrupted_leaves_the_earlier_export_whole(onnx_fp32, tiny_dir, tmp_path, monkeypatch):
    import shutil

    out = shutil.copytree(onnx_fp32, tmp_path / "onnx")
    before = snapshot(out)
    written = []

    def trace_component(module, spec, feeds, path, *args, **options):
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C on the third component
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"new")
        written.append(path)
        return {}

    monkeypatch.setattr(export, "trace_component", trace_component)
    result = cli("export", "--model", tiny_dir, "--out", out, "--precision", "fp32", "--force")
    assert result.exit_code == 130, result.output  # (diffusers' own loading bars come before the error)
    assert [line for line in result.stderr.splitlines() if "error" in line] == ["error: interrupted"], result.stderr
    assert "Traceback" not in result.output
    assert written[0].parent.parent == tmp_path and written[0].parent.name.startswith(".onnx.tmp-")
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]


@pytest.mark.slow  # a second full export: about a minute on 2 cores
def test_cli_export_force_replaces_an_earlier_export(onnx_fp32, tiny_dir, tmp_path):
    import shutil

    from voltacache.outputs import EXPORT, record_owned

    out = shutil.copytree(onnx_fp32, tmp_path / "onnx")
    (out / "stale.txt").write_text("from the earlier export")
    record_owned(out, EXPORT, "stale.txt")  # as if the earlier export had written it
    result = cli(
        "export", "--model", tiny_dir, "--out", out, "--precision", "fp32", "--deepcache-branch", "0", "--force"
    )
    assert result.exit_code == 0, result.output
    assert read_manifest(out).deepcache_branch == "0" and not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]
    # diffusers' and torch's chatter stays out of the user's terminal unless --debug (QUIET_THIRD_PARTIES)
    for chatter in ("Loading pipeline components", "torchvision is not installed", "FutureWarning"):
        assert chatter not in result.stderr, result.stderr


@pytest.mark.parametrize("extra", ["notes.txt", "engines/"])
def test_export_force_refuses_a_folder_holding_what_it_did_not_write(onnx_fp32, tiny_dir, tmp_path, extra):
    """A user's file, or engines built inside the export by an older version: named, nothing touched, no work done."""
    import shutil

    out = shutil.copytree(onnx_fp32, tmp_path / "onnx")
    if extra == "engines/":
        shutil.copytree(onnx_fp32, out / "engines")  # any folder of its own: another output, or the user's
    else:
        (out / extra).write_text("mine")
    before = snapshot(out)
    result = cli("export", "--model", tiny_dir, "--out", out, "--precision", "fp32", "--force")
    one_error_line(result, 2, f"--out {out}: holds {extra}", "which voltacache did not write there")
    assert snapshot(out) == before
