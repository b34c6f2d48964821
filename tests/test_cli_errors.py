"""Every user mistake ends in one line on stderr that names the argument or file, no traceback, and
the exit code of its kind (2: change the command; 1: it failed). docs/robustness.md lists them."""

import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from voltacache.cli import app

runner = CliRunner()


def dead_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens


def files(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "exists.png").write_bytes(b"mine")
    (tmp_path / "not-an-image.png").write_text("hello")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 binary")
    (tmp_path / "empty.txt").write_text("\n\n")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    return tmp_path


GENERATE = ["generate", "a red circle on a blue background"]
CASES = {
    # name: (arguments, exit code, words the line must hold); {t} is the test's folder, {e} the engines
    "steps 0": (GENERATE + ["--engines", "{e}", "--steps", "0", "-o", "{t}/a.png"], 2, "steps 0"),
    "steps too many": (GENERATE + ["--engines", "{e}", "--steps", "1001", "-o", "{t}/a.png"], 2, "steps 1001"),
    "guidance 1e30": (GENERATE + ["--engines", "{e}", "--guidance", "1e30", "-o", "{t}/a.png"], 2, "guidance"),
    "seed above int64": (GENERATE + ["--engines", "{e}", "--seed", str(2**64), "-o", "{t}/a.png"], 2, "seed"),
    "unknown scheduler": (GENERATE + ["--engines", "{e}", "--scheduler", "heun", "-o", "{t}/a.png"], 2, "heun"),
    "unknown cache mode": (GENERATE + ["--engines", "{e}", "--cache", "maybe", "-o", "{t}/a.png"], 2, "maybe"),
    "100 KB prompt": (["generate", "x" * 100_000, "--engines", "{e}", "-o", "{t}/a.png"], 2, "100000 bytes"),
    "binary prompts file": (["generate", "--engines", "{e}", "--prompts", "{t}/binary.txt"], 2, "not UTF-8"),
    "empty prompts file": (["generate", "--engines", "{e}", "--prompts", "{t}/empty.txt"], 2, "--prompts"),
    "missing prompts file": (["generate", "--engines", "{e}", "--prompts", "{t}/nope.txt"], 2, "no such file"),
    "-o a folder": (GENERATE + ["--engines", "{e}", "-o", "{t}/folder"], 2, "is a folder"),
    "-o not an image type": (GENERATE + ["--engines", "{e}", "-o", "{t}/a.txt"], 2, "not an image format"),
    "-o exists": (GENERATE + ["--engines", "{e}", "-o", "{t}/exists.png"], 2, "--force"),
    "init image missing": (GENERATE + ["--engines", "{e}", "--init-image", "{t}/nope.png"], 2, "--init-image"),
    "init image not an image": (
        GENERATE + ["--engines", "{e}", "--init-image", "{t}/not-an-image.png", "-o", "{t}/a.png"],
        2,
        "not a readable image",
    ),
    "served init image missing": (GENERATE + ["--url", "{d}", "--init-image", "{t}/nope.png"], 2, "--init-image"),
    "both engines and url": (GENERATE + ["--engines", "{e}", "--url", "{d}"], 2, "exactly one"),
    "concurrency in process": (GENERATE + ["--engines", "{e}", "--concurrency", "4", "-o", "{t}/a.png"], 2, "one at"),
    "no engines folder": (GENERATE + ["--engines", "{t}/folder", "-o", "{t}/a.png"], 1, "engine manifest"),
    "grpc to a dead port": (GENERATE + ["--url", "{d}", "-o", "{t}/a.png"], 1, "no voltacache server answers"),
    "http to a dead port": (
        GENERATE + ["--url", "{d}", "--protocol", "http", "-o", "{t}/a.png"],
        1,
        "no voltacache server answers",
    ),
    "cache index with --url": (GENERATE + ["--url", "{d}", "--cache-index", "{t}/c.db"], 2, "only in process"),
    "unknown protocol": (GENERATE + ["--url", "{d}", "--protocol", "smtp", "-o", "{t}/a.png"], 2, "--protocol"),
    "check-shapes on a non-image": (
        ["check-shapes", "{t}/not-an-image.png", "a red circle on a blue background"],
        2,
        "IMAGE",
    ),
    "check-shapes bad caption": (["check-shapes", "{t}/red.png", "a cat"], 2, "CAPTION"),
    "adaptive with an interval": (
        GENERATE + ["--engines", "{e}", "--cache-schedule", "adaptive", "--cache-interval", "3", "-o", "{t}/a.png"],
        2,
        "cache_interval 3",
    ),
    "threshold without adaptive": (
        GENERATE + ["--engines", "{e}", "--refresh-threshold", "0.2", "-o", "{t}/a.png"],
        2,
        "refresh_threshold",
    ),
    "calibration exists": (["calibrate", "--engines", "{e}"], 2, "--force"),
    "calibrate bad steps": (["calibrate", "--engines", "{e}", "--steps", "20,x"], 2, "--steps"),
    "calibrate empty prompts": (["calibrate", "--engines", "{e}", "--prompts", "{t}/empty.txt"], 2, "--prompts"),
    "calibrate no engines": (["calibrate", "--engines", "{t}/folder"], 1, "engine manifest"),
}


@pytest.mark.parametrize("case", CASES)
def test_one_line_no_traceback(case, engines_dir, tmp_path):
    args, code, words = CASES[case]
    folder, port = files(tmp_path), dead_port()
    args = [a.format(t=folder, e=engines_dir, d=port) for a in args]
    result = runner.invoke(app, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0]
    assert "Traceback" not in result.output and not result.stdout
    assert (folder / "exists.png").read_bytes() == b"mine"


def test_debug_shows_the_traceback(tmp_path):
    base = [sys.executable, "-m", "voltacache"]
    args = ["generate", "a cat", "--url", dead_port(), "-o", str(tmp_path / "a.png")]
    plain = subprocess.run(base + args, capture_output=True, text=True, timeout=120)
    debug = subprocess.run(base + ["--debug"] + args, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr and plain.stderr.count("\n") == 1
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ServerFailed" in debug.stderr
