import json
import re
import shutil

import numpy as np
import pytest
from helpers import cli, listing, one_error_line, snapshot

from voltacache.compile.build import build_engines
from voltacache.errors import RebuildNeeded, VoltacacheError
from voltacache.outputs import ENGINES, record_owned
from voltacache.pipeline.calibration import SCHEDULES_FILE
from voltacache.runtime.backends import AUTO_ORDER, BACKENDS, choose_backend
from voltacache.runtime.engines import load_engines
from voltacache.runtime.manifests import ENGINE_MANIFEST
from voltacache.specs import COMPONENTS, ROWS, UNET_DEEP

TRT_OK, TRT_WHY = BACKENDS["tensorrt"].available()


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
    assert manifest["export"]["batch_sizes"] == [1, 2, 4, 8]


def test_onnxruntime_model_keeps_the_dynamic_rows(engines_dir):
    import onnx

    for name in COMPONENTS:
        graph = onnx.load(str(engines_dir / f"{name}.onnx"), load_external_data=False).graph
        assert {v.type.tensor_type.shape.dim[0].dim_param for v in [*graph.input, *graph.output]} == {ROWS}


def test_auto_says_which_backend_and_why():
    backend, reason = choose_backend("auto")
    # the first of the order that runs here: which one depends on what is installed, never on the CPU kind
    runs = [name for name in AUTO_ORDER if BACKENDS[name].available()[0]]
    assert backend.name == runs[0] and ("tensorrt" in runs) == TRT_OK
    assert TRT_WHY in reason  # why TensorRT was (not) chosen


@pytest.mark.skipif(TRT_OK, reason="TensorRT and a GPU are present here")
def test_tensorrt_refused_with_reason_where_absent():
    with pytest.raises(VoltacacheError, match="--backend tensorrt: "):
        choose_backend("tensorrt")


@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT path needs tensorrt and a GPU: {TRT_WHY}")
def test_tensorrt_engines_match_onnxruntime(onnx_fp32, engines_dir, tmp_path):
    trt_dir = tmp_path / "trt"
    manifest = build_engines(onnx_fp32, trt_dir, backend="tensorrt")  # runs polygraphy's comparator
    assert manifest.versions["compute_capability"]
    trt = load_engines(trt_dir, cuda_graph=True).runners
    ort = load_engines(engines_dir).runners
    assert trt[UNET_DEEP].sizes == (1, 2, 4, 8) and len(trt[UNET_DEEP].contexts) == 4
    for n in (1, 3, 9):  # a profile's size, padded up to one, split above the largest
        spec = trt[UNET_DEEP].spec.for_images(n)
        feeds = {t.name: np.random.default_rng(n).standard_normal(t.shape).astype(t.dtype) for t in spec.inputs}
        a, b = trt[UNET_DEEP].infer(feeds), ort[UNET_DEEP].infer(feeds)
        for name in a:
            assert a[name].shape == b[name].shape
            np.testing.assert_allclose(a[name], b[name], atol=2e-2, rtol=2e-2)


def test_engines_from_another_runtime_version_are_refused(engines_dir, tmp_path):
    copy = copy_engines(engines_dir, tmp_path)
    manifest = json.loads((copy / ENGINE_MANIFEST).read_text())
    manifest["versions"]["onnxruntime"] = "0.0.1"
    (copy / ENGINE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RebuildNeeded, match="onnxruntime 0.0.1.*rebuild"):
        load_engines(copy)


def test_engines_from_before_step_batching_are_refused(engines_dir, onnx_fp32, tmp_path):
    copy = copy_engines(engines_dir, tmp_path)
    manifest = json.loads((copy / ENGINE_MANIFEST).read_text())
    del manifest["export"]["batch_sizes"]
    (copy / ENGINE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RebuildNeeded, match="older voltacache .*run `voltacache export` again"):
        load_engines(copy)
    # and an export from before is not built
    old = shutil.copytree(onnx_fp32, tmp_path / "onnx")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["batch_sizes"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    result = cli("build", "--onnx", old, "--out", tmp_path / "new", "--backend", "onnxruntime")
    one_error_line(result, 1, "exported by an older voltacache", "run `voltacache export` again")
    assert listing(tmp_path) == ["engines", "onnx"]


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


def test_failed_build_leaves_the_earlier_engines_whole(onnx_fp32, engines_dir, tmp_path):
    onnx_copy = shutil.copytree(onnx_fp32, tmp_path / "onnx")
    third = onnx_copy / f"{COMPONENTS[2]}.onnx"
    data = third.read_bytes()
    third.write_bytes(data[: len(data) // 2])  # a torn copy: the first two components build, the third fails
    engines = copy_engines(engines_dir, tmp_path)
    before = snapshot(engines)
    result = cli("build", "--onnx", onnx_copy, "--out", engines, "--backend", "onnxruntime", "--force")
    one_error_line(result, 1, f"{third}: ONNX Runtime cannot read this ONNX file", "run `voltacache export` again")
    assert snapshot(engines) == before
    assert set(load_engines(engines).runners) == set(COMPONENTS)
    assert listing(tmp_path) == ["engines", "onnx"]


def test_build_refuses_earlier_engines_without_force(onnx_fp32, engines_dir, tmp_path):
    engines = copy_engines(engines_dir, tmp_path)
    before = snapshot(engines)
    result = cli("build", "--onnx", onnx_fp32, "--out", engines, "--backend", "onnxruntime")
    one_error_line(result, 2, f"--out {engines}: holds an earlier engines folder; pass --force")
    assert snapshot(engines) == before


def test_build_force_replaces_earlier_engines_and_keeps_their_calibration(onnx_fp32, engines_dir, tmp_path):
    engines = copy_engines(engines_dir, tmp_path)
    (engines / "stale.plan").write_bytes(b"from the earlier build")
    record_owned(engines, ENGINES, "stale.plan")  # as if the earlier build had written it
    calibration = (engines / SCHEDULES_FILE).read_bytes()
    result = cli("build", "--onnx", onnx_fp32, "--out", engines, "--backend", "onnxruntime", "--force")
    assert result.exit_code == 0, result.output
    assert "calibrat" not in result.stderr  # the same export: the calibration still holds, nothing to say
    assert not (engines / "stale.plan").exists()
    assert (engines / SCHEDULES_FILE).read_bytes() == calibration  # hours of work survive a rebuild
    assert SCHEDULES_FILE in ENGINES.owned(engines)
    assert set(load_engines(engines).runners) == set(COMPONENTS)
    assert listing(tmp_path) == ["engines"]


def test_a_rebuild_from_another_export_sets_the_calibration_aside_and_says_so(onnx_fp32, engines_dir, tmp_path):
    engines = copy_engines(engines_dir, tmp_path)
    calibration = (engines / SCHEDULES_FILE).read_bytes()
    onnx = shutil.copytree(onnx_fp32, tmp_path / "onnx")
    manifest = json.loads((onnx / "manifest.json").read_text())
    (onnx / "manifest.json").write_text(json.dumps(manifest | {"fingerprint": "f" * 64}))
    told = f"{engines / SCHEDULES_FILE}: measured on another export than the one built now; kept as"
    with pytest.warns(UserWarning, match=re.escape(told)) as warned:  # the CLI prints it: "warning: ..."
        result = cli("build", "--onnx", onnx, "--out", engines, "--backend", "onnxruntime", "--force")
    assert result.exit_code == 0, result.output
    kept = [p for p in listing(engines) if p.startswith("deepcache_schedules.other-export-")]
    assert len(kept) == 1 and (engines / kept[0]).read_bytes() == calibration
    assert not (engines / SCHEDULES_FILE).exists()
    assert kept[0] in str(warned[0].message)
    # set aside is still owned: the next rebuild keeps it as it is
    result = cli("build", "--onnx", onnx, "--out", engines, "--backend", "onnxruntime", "--force")
    assert result.exit_code == 0 and (engines / kept[0]).read_bytes() == calibration


@pytest.mark.parametrize("extra", ["notes.txt", "photos/", "tokenizer/notes.txt"])
def test_build_force_never_deletes_what_it_did_not_write(onnx_fp32, engines_dir, tmp_path, extra):
    engines = copy_engines(engines_dir, tmp_path)
    path = engines / extra.rstrip("/")
    path.mkdir() if extra.endswith("/") else path.write_text("mine")
    before = snapshot(engines)
    result = cli("build", "--onnx", onnx_fp32, "--out", engines, "--backend", "onnxruntime", "--force")
    one_error_line(result, 2, f"--out {engines}: holds {extra}, which voltacache did not write there")
    assert snapshot(engines) == before


def test_engines_inside_the_export_are_refused(onnx_fp32, tmp_path):
    onnx = shutil.copytree(onnx_fp32, tmp_path / "onnx")
    result = cli("build", "--onnx", onnx, "--out", onnx / "engines", "--backend", "onnxruntime")
    one_error_line(result, 2, f"--out {onnx / 'engines'}: inside the export {onnx} (its manifest.json)")
    assert "engines" not in listing(onnx)


def test_build_never_replaces_a_users_folder(onnx_fp32, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = cli("build", "--onnx", onnx_fp32, "--out", out, "--backend", "onnxruntime", "--force")
    one_error_line(result, 2, f"--out {out}: not an engines folder (no engines.json in it)")
    assert listing(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    one_error_line(cli("build", "--onnx", onnx_fp32, "--out", onnx_fp32, "--force"), 2, "the same path as --onnx")


def test_build_from_a_folder_that_is_not_an_export(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    result = cli("build", "--onnx", folder, "--out", tmp_path / "engines")
    one_error_line(result, 2, f"--onnx {folder}: not an export (no manifest.json in it)", "voltacache export")
    (folder / "manifest.json").write_text('{"format": 1, "fingerprint": "x", "components": {}}')
    result = cli("build", "--onnx", folder, "--out", tmp_path / "engines")
    one_error_line(result, 1, f"{folder / 'manifest.json'}: not a voltacache export manifest")
    one_error_line(cli("build", "--onnx", tmp_path / "nope", "--out", tmp_path / "engines"), 2, "no such folder")
    for torn in ('{"format": 1, "finger', "[]", "{}"):  # a manifest that is there but not readable as ours
        (folder / "manifest.json").write_text(torn)
        result = cli("build", "--onnx", folder, "--out", tmp_path / "engines")
        one_error_line(result, 1, f"{folder / 'manifest.json'}: ", "export")
        assert "no manifest.json in it" not in result.stderr
    assert listing(tmp_path) == ["photos"]


def test_engines_whose_manifest_is_torn_say_a_way_out_that_works(engines_dir, onnx_fp32, tmp_path):
    import shutil

    torn = shutil.copytree(engines_dir, tmp_path / "engines")
    (torn / "engines.json").write_text('{"backend": "onnx')
    (torn / "mine.txt").write_text("mine")
    one_error_line(cli("generate", "a cat", "--engines", torn, "-o", tmp_path / "a.png"), 1, "into a new folder")
    # build will not replace a folder whose manifest cannot say what it wrote, and says why
    result = cli("build", "--onnx", onnx_fp32, "--out", torn, "--backend", "onnxruntime", "--force")
    one_error_line(result, 2, "its engines.json cannot be read, so what voltacache wrote there is unknown")
    # the advice works: a new folder
    result = cli("build", "--onnx", onnx_fp32, "--out", tmp_path / "new", "--backend", "onnxruntime")
    assert result.exit_code == 0 and (torn / "mine.txt").read_text() == "mine"
