"""staged_output: an output appears whole or not at all, and nothing voltacache did not write is replaced."""

import json

import pytest
from helpers import listing

from voltacache.errors import OutputExists, UsageError
from voltacache.outputs import check_target, json_marker, refuse_overlap, staged_output

ours = json_marker("marker.json", "kind")


def write(folder, text="new"):
    (folder / "data.txt").write_text(text)
    (folder / "marker.json").write_text(json.dumps({"kind": "test"}))


def earlier(path, text="old"):
    path.mkdir(parents=True)
    write(path, text)
    return path


def test_new_folder_appears_whole(tmp_path):
    with staged_output(tmp_path / "out", ours=ours) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".out.tmp-")
        assert not (tmp_path / "out").exists()
        write(stage)
    assert (tmp_path / "out" / "data.txt").read_text() == "new"
    assert listing(tmp_path) == ["out"]


def test_missing_parents_are_made_and_removed_again_on_failure(tmp_path):
    with pytest.raises(RuntimeError), staged_output(tmp_path / "a" / "b" / "out", ours=ours) as stage:
        write(stage)
        raise RuntimeError("failed")
    assert listing(tmp_path) == []
    with staged_output(tmp_path / "a" / "b" / "out", ours=ours) as stage:
        write(stage)
    assert (tmp_path / "a" / "b" / "out" / "data.txt").is_file()


def test_empty_folder_is_written_into(tmp_path):
    (tmp_path / "out").mkdir()
    with staged_output(tmp_path / "out", ours=ours) as stage:
        write(stage)
    assert (tmp_path / "out" / "data.txt").read_text() == "new"
    assert listing(tmp_path) == ["out"]


def test_a_folder_voltacache_did_not_write_is_refused_even_with_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(OutputExists, match=r"--out .*out: not an? .*no marker.json"):
            with staged_output(tmp_path / "out", force=force, ours=ours, what="export"):
                pytest.fail("the body must not run")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert listing(tmp_path) == ["out"]


def test_earlier_output_needs_force(tmp_path):
    out = earlier(tmp_path / "out")
    with pytest.raises(OutputExists, match="pass --force"):
        with staged_output(out, ours=ours):
            pytest.fail("the body must not run")
    assert (out / "data.txt").read_text() == "old"
    with staged_output(out, force=True, ours=ours) as stage:
        write(stage)
        assert (out / "data.txt").read_text() == "old"  # the old one stays until the new one is complete
    assert (out / "data.txt").read_text() == "new"
    assert listing(tmp_path) == ["out"]


@pytest.mark.parametrize("failure", [RuntimeError("failed"), KeyboardInterrupt()])
def test_failure_leaves_the_earlier_output_whole(tmp_path, failure):
    out = earlier(tmp_path / "out")
    with pytest.raises(type(failure)), staged_output(out, force=True, ours=ours) as stage:
        (stage / "data.txt").write_text("half")
        raise failure
    assert (out / "data.txt").read_text() == "old"
    assert listing(tmp_path) == ["out"]


def test_something_appearing_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExists), staged_output(out, ours=ours) as stage:
        write(stage)
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert listing(out) == ["notes.txt"]
    assert listing(tmp_path) == ["out"]


def test_unwritable_paths_name_the_argument(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UsageError, match=r"--out /proc/voltacache-test/out: cannot create"):
        with staged_output("/proc/voltacache-test/out", ours=ours):
            pytest.fail("the body must not run")
    with pytest.raises(UsageError, match=r"--out .*file/out: cannot write there \(Not a directory\)"):
        with staged_output(tmp_path / "file" / "out", ours=ours):
            pytest.fail("the body must not run")
    with pytest.raises(OutputExists, match=r"--out .*file: a file, not a folder"):
        with staged_output(tmp_path / "file", force=True, ours=ours):
            pytest.fail("the body must not run")
    assert (tmp_path / "file").read_text() == "mine"


def test_symbolic_link_is_refused(tmp_path):
    earlier(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputExists, match="symbolic link"):
        check_target(tmp_path / "link", force=True, ours=ours)


def test_single_file(tmp_path):
    is_ours = lambda path: path.read_text().startswith("ours")  # noqa: E731
    target = tmp_path / "model.safetensors"
    with staged_output(target, ours=is_ours, file=True) as stage:
        assert stage.name.startswith(".model.safetensors.tmp-")
        stage.write_text("ours 1")
    assert target.read_text() == "ours 1"
    with pytest.raises(OutputExists, match="pass --force"):
        with staged_output(target, ours=is_ours, file=True):
            pytest.fail("the body must not run")
    with pytest.raises(KeyboardInterrupt), staged_output(target, force=True, ours=is_ours, file=True) as stage:
        stage.write_text("ours, half")
        raise KeyboardInterrupt
    assert target.read_text() == "ours 1"
    with staged_output(target, force=True, ours=is_ours, file=True) as stage:
        stage.write_text("ours 2")
    assert target.read_text() == "ours 2"
    assert listing(tmp_path) == ["model.safetensors"]
    target.write_text("a user's checkpoint")
    with pytest.raises(OutputExists, match="voltacache did not write it"):
        with staged_output(target, force=True, ours=is_ours, file=True):
            pytest.fail("the body must not run")
    assert target.read_text() == "a user's checkpoint"


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
