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
    (tmp_path / "style.safetensors").write_bytes(b"not read before the engines are checked")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    (tmp_path / "torn-model").mkdir()
    (tmp_path / "torn-model" / "model_index.json").write_text('{"_class_name": "StableDiffusionPip')
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
    "no engines folder": (GENERATE + ["--engines", "{t}/folder", "-o", "{t}/a.png"], 2, "not an engines folder"),
    "engines typo": (GENERATE + ["--engines", "{t}/nope", "-o", "{t}/a.png"], 2, "nope: no such folder"),
    "a size the engines do not have": (
        GENERATE + ["--engines", "{e}", "--height", "63", "-o", "{t}/a.png"],
        2,
        "size 64x63: these engines are static at 64x64",
    ),
    "size conditioning on SD 1.5": (
        GENERATE + ["--engines", "{e}", "--original-size", "512,512", "-o", "{t}/a.png"],
        2,
        "original_size: size conditioning is SDXL's",
    ),
    "uncalibrated steps": (
        GENERATE + ["--engines", "{e}", "--steps", "7", "--cache-interval", "3", "--cache-schedule", "calibrated"],
        2,
        "calibrated for 12 steps, not 7; run `voltacache calibrate --engines {e} --steps 7,12 --intervals 3 --force`",
    ),
    "calibrated N = 1": (
        GENERATE + ["--engines", "{e}", "--steps", "12", "--cache-schedule", "calibrated", "-o", "{t}/a.png"],
        2,
        "cache_interval 1: a calibrated schedule runs the full U-Net on fewer steps than all 12, at N from 2 to 11",
    ),
    "-o where nothing can be written": (GENERATE + ["--engines", "{e}", "-o", "/proc/x.png"], 2, "cannot write in"),
    "-o under a file": (GENERATE + ["--engines", "{e}", "-o", "{t}/exists.png/a.png"], 2, "is a file, not a folder"),
    "a lora scale that is no number": (
        GENERATE + ["--engines", "{e}", "--lora", "{t}/red.png:abc", "-o", "{t}/a.png"],
        2,
        "scale 'abc' is not a number",
    ),
    "a served lora scale that is no number": (
        GENERATE + ["--url", "{d}", "--lora", "style:abc", "-o", "{t}/a.png"],
        2,
        "--lora style:abc: scale 'abc' is not a number",
    ),
    "a URL with a scheme": (GENERATE + ["--url", "http://{d}", "-o", "{t}/a.png"], 2, "without a scheme"),
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
    "check-shapes bad caption": (["check-shapes", "{t}/red.png", "a cat"], 2, "a COLOR SHAPE on a COLOR background"),
    "a blob store without an index": (
        GENERATE + ["--engines", "{e}", "--blob-store", "{t}/blobs", "-o", "{t}/a.png"],
        2,
        "--blob-store: where a cache keeps its images; give it with --cache-index",
    ),
    "an s3 blob store without a bucket": (
        GENERATE + ["--engines", "{e}", "--cache-index", "{t}/c.db", "--blob-store", "s3://", "-o", "{t}/a.png"],
        2,
        "--blob-store s3://: name the bucket",
    ),
    "a bare host as --url": (GENERATE + ["--url", "127.0.0.1", "-o", "{t}/a.png"], 2, "e.g. 127.0.0.1:8001"),
    "calibrate --intervals 1": (["calibrate", "--engines", "{e}", "--intervals", "1"], 2, "e.g. 2,3,4,5"),
    "a seed beyond 64 bits": (["init-tiny", "{t}/m", "--seed", "99999999999999999999999"], 2, "--seed"),
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
    "calibrate no engines": (["calibrate", "--engines", "{t}/folder"], 2, "not an engines folder"),
    "calibrate N at or above the steps": (
        ["calibrate", "--engines", "{e}", "--steps", "3", "--intervals", "5", "--force"],
        2,
        "--intervals 5: N must be below a calibrated step count (3)",
    ),
    "ui on an impossible port": (["ui", "--url", "{d}", "--port", "99999"], 2, "--port 99999: a port is a number"),
    "strength without an init image": (
        GENERATE + ["--engines", "{e}", "--strength", "0.5", "-o", "{t}/a.png"],
        2,
        "--strength: how much of an init image is repainted; give it with --init-image",
    ),
    "bench with no steps": (["bench", "--model", "{t}/folder", "--steps", "0"], 2, "--steps 0: 1 or more"),
    # before the model and the extras are checked: one run names every argument's mistake in turn
    "bench with interval 0": (["bench", "--model", "{t}/none", "--intervals", "0"], 2, "--intervals '0': whole"),
    "bench with a branch that is none": (["bench", "--model", "{t}/none", "--branches", "x"], 2, "--branches 'x'"),
    "serve a file": (["serve", "--repo", "{t}/exists.png"], 2, "a file, not a folder"),
    "serve a log file that is a folder": (
        ["serve", "--repo", "{r}", "--log-file", "{t}/folder", "--http-port", "1"],
        2,
        "--log-file {t}/folder: a folder; name a file",
    ),
    "serve a log file that cannot be written": (
        ["serve", "--repo", "{r}", "--log-file", "/proc/x.log", "--http-port", "1"],
        2,
        "--log-file /proc/x.log: cannot write in /proc",
    ),
    "export a model that is an export": (
        ["export", "--model", "{o}", "--out", "{t}/o"],
        2,
        "an export voltacache wrote, not a model",
    ),
    "export a model that is no checkpoint": (
        ["export", "--model", "{t}/binary.txt", "--out", "{t}/o"],
        2,
        "not a checkpoint",
    ),
    "build from a missing folder": (["build", "--onnx", "{t}/nope", "--out", "{t}/e"], 2, "--onnx {t}/nope: no such"),
    "deploy from a missing folder": (["deploy", "--engines", "{t}/nope", "--repo", "{t}/r"], 2, "no such folder"),
    "deploy to a path with a space": (
        ["deploy", "--engines", "{e}", "--repo", "{t}/my repo"],
        2,
        "its path holds whitespace",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_one_line_no_traceback(case, engines_dir, onnx_fp32, triton_repo, tmp_path):
    args, code, words = CASES[case]
    folder, port = files(tmp_path), dead_port()
    places = dict(t=folder, e=engines_dir, d=port, o=onnx_fp32, r=triton_repo)
    args = [a.format(**places) for a in args]
    result = runner.invoke(app, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words.format(**places) in lines[0]
    assert "Traceback" not in result.output and not result.stdout
    assert (folder / "exists.png").read_bytes() == b"mine"


def test_debug_shows_the_traceback(tmp_path):
    base = [sys.executable, "-m", "voltacache"]
    args = ["generate", "a cat", "--url", dead_port(), "-o", str(tmp_path / "a.png")]
    plain = subprocess.run(base + args, capture_output=True, text=True, timeout=120)
    debug = subprocess.run(base + ["--debug"] + args, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr and plain.stderr.count("\n") == 1
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ServerFailed" in debug.stderr


PARSE_ERRORS = {
    "seed abc": (GENERATE + ["--engines", "E", "--seed", "abc"], "Invalid value for '--seed'"),
    "steps 2.5": (GENERATE + ["--engines", "E", "--steps", "2.5"], "Invalid value for '--steps'"),
    "unknown option": (GENERATE + ["--stepz", "3"], "No such option: --stepz"),
    "unknown command": (["generat", "a cat"], "No such command 'generat'"),
    "missing value": (["export", "--model"], "Option '--model' requires an argument"),
}


@pytest.mark.parametrize("case", PARSE_ERRORS)
def test_a_command_line_that_does_not_parse_is_one_line(case):
    """click's own errors, through the real entry point: one line, exit 2, no box of help around it."""
    args, words = PARSE_ERRORS[case]
    result = subprocess.run([sys.executable, "-m", "voltacache", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert not result.stdout


FAST_REFUSALS = {
    "unknown preset": ["init-tiny", "{t}/m", "--preset", "nope"],
    "unknown precision": ["export", "--model", "{t}", "--out", "{t}/o", "--precision", "fp8"],
    "bad batch sizes": ["export", "--model", "{t}", "--out", "{t}/o", "--batch-sizes", "0,3"],
    "export height": ["export", "--model", "{t}", "--out", "{t}/o", "--height", "63"],
    "a size the engines do not have": GENERATE + ["--engines", "{e}", "--height", "63", "-o", "{t}/a.png"],
    "uncalibrated steps": GENERATE + ["--engines", "{e}", "--steps", "7", "--cache-schedule", "calibrated"],
    "a lora on int8 engines": GENERATE + ["--engines", "{i}", "--lora", "{t}/style.safetensors", "-o", "{t}/a.png"],
    "a torn model_index.json": ["export", "--model", "{t}/torn-model", "--out", "{t}/o"],
}
FAST_WORDS = {
    "a lora on int8 engines": "lora: not on int8 engines (their weights are quantized)",
    "a torn model_index.json": "invalid JSON (Unterminated string starting at: line 1 column 17 (char 16)); copy",
}


@pytest.mark.parametrize("case", FAST_REFUSALS)
def test_a_mistake_is_refused_before_torch_or_an_engine_loads(case, engines_dir, tmp_path):
    """The facts are in the command line and the manifests: a refusal costs no import of torch, onnx or
    diffusers (once 19 s under load) and no engine load."""
    import json
    import shutil

    folder = files(tmp_path)
    int8 = shutil.copytree(engines_dir, tmp_path / "int8", ignore=shutil.ignore_patterns("*.onnx*"))
    manifest = json.loads((int8 / "engines.json").read_text())
    manifest["export"]["precision"] = "int8"
    (int8 / "engines.json").write_text(json.dumps(manifest))
    args = [a.format(t=folder, e=engines_dir, i=int8) for a in FAST_REFUSALS[case]]
    probe = (
        "import sys\n"
        "from voltacache.cli import main\n"
        f"sys.argv = ['voltacache', *{args!r}]\n"
        "try:\n    main()\n"
        "except SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'onnx', 'diffusers', 'onnxruntime') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "2 []", (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert FAST_WORDS.get(case, "") in result.stderr


def test_calibrate_says_it_is_not_offered_for_inpainting_engines(engines_dir, tmp_path):
    import json
    import shutil

    engines = shutil.copytree(engines_dir, tmp_path / "inpaint", ignore=shutil.ignore_patterns("*.onnx*"))
    manifest = json.loads((engines / "engines.json").read_text())
    geometry = manifest["export"]["geometry"]
    geometry["sample_channels"] = 2 * geometry["latent_channels"] + 1  # SD 1.5 inpainting's 9-channel U-Net
    (engines / "engines.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["calibrate", "--engines", str(engines), "--force"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "calibrate is not offered for inpainting engines" in result.stderr
