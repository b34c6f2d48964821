"""Outputs: written whole or not at all; replaced only where voltacache wrote them, file by file; never nested."""

import json

import pytest
from helpers import listing

from voltacache.errors import OutputExists, UsageError
from voltacache.outputs import (
    OutputKind,
    check_file,
    check_folder,
    record_owned,
    refuse_overlap,
    staged_file,
    staged_output,
)

KIND = OutputKind("export", "marker.json", ("kind",), legacy=("*.txt", "sub/**"))


def write(folder, text="new"):
    (folder / "data.txt").write_text(text)
    (folder / "marker.json").write_text(json.dumps({"kind": "test"}))


def earlier(path, text="old"):
    with staged_output(path, KIND) as stage:
        write(stage, text)
    return path


def test_new_folder_appears_whole_and_lists_what_it_wrote(tmp_path):
    with staged_output(tmp_path / "out", KIND) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".out.tmp-")
        assert not (tmp_path / "out").exists()
        write(stage)
        (stage / "deep").mkdir()
        (stage / "deep" / "weights.bin").write_bytes(b"w")
    assert (tmp_path / "out" / "data.txt").read_text() == "new"
    assert json.loads((tmp_path / "out" / "marker.json").read_text())["owned"] == ["data.txt", "deep/weights.bin"]
    assert listing(tmp_path) == ["out"]


def test_missing_parents_are_made_and_removed_again_on_failure(tmp_path):
    with pytest.raises(RuntimeError), staged_output(tmp_path / "a" / "b" / "out", KIND) as stage:
        write(stage)
        raise RuntimeError("failed")
    assert listing(tmp_path) == []
    with staged_output(tmp_path / "a" / "b" / "out", KIND) as stage:
        write(stage)
    assert (tmp_path / "a" / "b" / "out" / "data.txt").is_file()


def test_empty_folder_is_written_into(tmp_path):
    (tmp_path / "out").mkdir()
    with staged_output(tmp_path / "out", KIND) as stage:
        write(stage)
    assert (tmp_path / "out" / "data.txt").read_text() == "new"
    assert listing(tmp_path) == ["out"]


def test_a_folder_voltacache_did_not_write_is_refused_even_with_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(OutputExists, match=r"--out .*out: not an export \(no marker.json in it\)"):
            with staged_output(tmp_path / "out", KIND, force=force):
                pytest.fail("the body must not run")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert listing(tmp_path) == ["out"]


def test_earlier_output_needs_force(tmp_path):
    out = earlier(tmp_path / "out")
    with pytest.raises(OutputExists, match="pass --force"):
        with staged_output(out, KIND):
            pytest.fail("the body must not run")
    assert (out / "data.txt").read_text() == "old"
    with staged_output(out, KIND, force=True) as stage:
        write(stage)
        assert (out / "data.txt").read_text() == "old"  # the old one stays until the new one is complete
    assert (out / "data.txt").read_text() == "new"
    assert listing(tmp_path) == ["out"]


@pytest.mark.parametrize("extra", ["notes.txt", "photos/", "deep/notes.txt", "engines/"])
def test_anything_voltacache_did_not_write_is_refused_with_force_and_kept(tmp_path, extra):
    """The data-loss cases: a user's file (at the top or inside a folder voltacache wrote), a user's
    folder, another output nested inside: refused by name, nothing deleted."""
    out = tmp_path / "out"
    with staged_output(out, KIND) as stage:
        write(stage)
        (stage / "deep").mkdir()
        (stage / "deep" / "weights.bin").write_bytes(b"w")
    path = out / extra.rstrip("/")
    if extra.endswith("/"):
        path.mkdir()
        (path / "mine.jpg").write_bytes(b"mine")
        if extra == "engines/":
            (path / "marker.json").write_text(json.dumps({"kind": "nested"}))
    else:
        path.write_text("mine")
    nested = r" \(an export of its own\)" if extra == "engines/" else ""
    with pytest.raises(OutputExists, match=rf"holds {extra}{nested}, which voltacache did not write there"):
        with staged_output(out, KIND, force=True):
            pytest.fail("the body must not run")
    assert path.exists() and (out / "data.txt").read_text() == "new"


def test_a_file_appearing_during_the_work_is_refused_at_the_commit(tmp_path):
    out = earlier(tmp_path / "out")
    with pytest.raises(OutputExists, match="holds late.txt"), staged_output(out, KIND, force=True) as stage:
        write(stage, "newer")
        (out / "late.txt").write_text("appeared during the work")
    assert (out / "late.txt").read_text() == "appeared during the work"
    assert (out / "data.txt").read_text() == "old"
    assert listing(tmp_path) == ["out"]


def test_carry_keeps_owned_artifacts_and_they_stay_owned(tmp_path):
    out = earlier(tmp_path / "out")
    (out / "calibration.json").write_text("hours of work")
    record_owned(out, KIND, "calibration.json")

    def carry(old, owned, stage):
        assert "calibration.json" in owned
        (stage / "calibration.json").write_bytes((old / "calibration.json").read_bytes())

    with staged_output(out, KIND, force=True, carry=carry) as stage:
        write(stage, "newer")
    assert (out / "calibration.json").read_text() == "hours of work"
    with staged_output(out, KIND, force=True) as stage:  # owned: replaced (not carried) without complaint
        write(stage, "newest")
    assert listing(out) == ["data.txt", "marker.json"]


def test_an_output_from_before_the_inventory_owns_what_that_version_wrote(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    write(out, "old")
    (out / "sub" / "w.bin").write_bytes(b"w")
    (out / "photo.jpg").write_bytes(b"mine")
    with pytest.raises(OutputExists, match="holds photo.jpg"):
        check_folder(out, KIND, force=True)
    (out / "photo.jpg").unlink()
    with staged_output(out, KIND, force=True) as stage:
        write(stage)
    assert listing(out) == ["data.txt", "marker.json"]


def test_an_output_inside_another_is_refused_at_creation(tmp_path):
    out = earlier(tmp_path / "out")
    for target in (out / "engines", out / "deep" / "er"):
        with pytest.raises(UsageError, match=r"inside the export .*out \(its marker.json\)"):
            with staged_output(target, KIND):
                pytest.fail("the body must not run")
    assert listing(out) == ["data.txt", "marker.json"]


@pytest.mark.parametrize("failure", [RuntimeError("failed"), KeyboardInterrupt()])
def test_failure_leaves_the_earlier_output_whole(tmp_path, failure):
    out = earlier(tmp_path / "out")
    with pytest.raises(type(failure)), staged_output(out, KIND, force=True) as stage:
        (stage / "data.txt").write_text("half")
        raise failure
    assert (out / "data.txt").read_text() == "old"
    assert listing(tmp_path) == ["out"]


def test_something_appearing_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExists), staged_output(out, KIND) as stage:
        write(stage)
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert listing(out) == ["notes.txt"]
    assert listing(tmp_path) == ["out"]


def test_unwritable_paths_name_the_argument(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UsageError, match=r"--out /proc/voltacache-test/out: cannot create"):
        with staged_output("/proc/voltacache-test/out", KIND):
            pytest.fail("the body must not run")
    with pytest.raises(UsageError, match=r"--out .*file/out: cannot write there \(Not a directory\)"):
        with staged_output(tmp_path / "file" / "out", KIND):
            pytest.fail("the body must not run")
    with pytest.raises(OutputExists, match=r"--out .*file: a file, not a folder"):
        with staged_output(tmp_path / "file", KIND, force=True):
            pytest.fail("the body must not run")
    assert (tmp_path / "file").read_text() == "mine"


def test_symbolic_link_is_refused(tmp_path):
    earlier(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputExists, match="symbolic link"):
        check_folder(tmp_path / "link", KIND, force=True)


def test_single_file(tmp_path):
    is_ours = lambda path: path.read_text().startswith("ours")  # noqa: E731
    target = tmp_path / "model.safetensors"
    with staged_file(target, ours=is_ours) as stage:
        assert stage.name.startswith(".model.safetensors.tmp-")
        stage.write_text("ours 1")
    assert target.read_text() == "ours 1"
    with pytest.raises(OutputExists, match="pass --force"):
        with staged_file(target, ours=is_ours):
            pytest.fail("the body must not run")
    with pytest.raises(KeyboardInterrupt), staged_file(target, force=True, ours=is_ours) as stage:
        stage.write_text("ours, half")
        raise KeyboardInterrupt
    assert target.read_text() == "ours 1"
    with staged_file(target, force=True, ours=is_ours) as stage:
        stage.write_text("ours 2")
    assert target.read_text() == "ours 2"
    assert listing(tmp_path) == ["model.safetensors"]
    target.write_text("a user's checkpoint")
    with pytest.raises(OutputExists, match="voltacache did not write it"):
        with staged_file(target, force=True, ours=is_ours):
            pytest.fail("the body must not run")
    assert target.read_text() == "a user's checkpoint"
    with pytest.raises(OutputExists, match="a folder, not a file"):
        check_file(tmp_path, force=True, ours=is_ours)


def test_overlap_with_the_input_is_refused(tmp_path):
    source = tmp_path / "engines"
    with pytest.raises(UsageError, match="the same path as --engines"):
        refuse_overlap(source, source, "--repo", "--engines")
    with pytest.raises(UsageError, match="contains --engines"):
        refuse_overlap(tmp_path, source, "--repo", "--engines")
    refuse_overlap(source / "repo", source, "--out", "--onnx")  # inside: allowed unless asked
    with pytest.raises(UsageError, match="inside --engines"):
        refuse_overlap(source / "repo", source, "--repo", "--engines", inside=True)
    refuse_overlap(tmp_path / "repo", source, "--repo", "--engines", inside=True)


def test_bytecode_python_compiled_from_its_files_is_its_own(tmp_path):
    """A served repository gains __pycache__ when Triton's Python backend imports its models: a redeploy
    replaces it; bytecode of a module voltacache did not write stays the user's."""
    with staged_output(tmp_path / "repo", KIND) as stage:
        write(stage)
        (stage / "m" / "1").mkdir(parents=True)
        (stage / "m" / "1" / "model.py").write_text("x = 1\n")
    cache = tmp_path / "repo" / "m" / "1" / "__pycache__"
    cache.mkdir()
    (cache / "model.cpython-311.pyc").write_bytes(b"compiled")
    with staged_output(tmp_path / "repo", KIND, force=True) as stage:
        write(stage, "again")
    assert listing(tmp_path / "repo") == ["data.txt", "marker.json"]
    (tmp_path / "repo" / "__pycache__").mkdir()
    (tmp_path / "repo" / "__pycache__" / "mine.cpython-311.pyc").write_bytes(b"user's")
    with pytest.raises(UsageError, match="holds __pycache__/"), staged_output(tmp_path / "repo", KIND, force=True):
        pass
    assert (tmp_path / "repo" / "__pycache__" / "mine.cpython-311.pyc").read_bytes() == b"user's"


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path):
    """SIGKILL leaves `.out.tmp-<pid>` beside the output: the next run removes it when that process is gone,
    and nothing else (a live run's staging, a name that only looks alike)."""
    import os
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    for name in (f".out.tmp-{gone.pid}", f".out.tmp-{gone.pid}-1", f".out.tmp-{os.getpid()}", ".out.tmp-mine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part.onnx").write_bytes(b"half")
    earlier(tmp_path / "out")
    assert listing(tmp_path) == [f".out.tmp-{os.getpid()}", ".out.tmp-mine", "out"]
