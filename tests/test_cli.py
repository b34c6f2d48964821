import subprocess
import sys

import pytest
from typer.testing import CliRunner

from voltacache.cli import app

SUBCOMMANDS = ["init-tiny", "export", "build", "deploy", "serve", "generate", "bench", "cache", "check-shapes"]
runner = CliRunner()


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "voltacache", "--help"], capture_output=True, text=True, check=True)
    for name in SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.slow
def test_init_tiny_writes_loadable_pipeline(tmp_path):
    from voltacache.compile.checkpoint import load_pipeline

    single = tmp_path / "tiny.safetensors"
    result = runner.invoke(app, ["init-tiny", str(tmp_path / "m"), "--seed", "3", "--single-file", str(single)])
    assert result.exit_code == 0, result.output
    assert load_pipeline(tmp_path / "m").unet is not None
    assert load_pipeline(single, config=tmp_path / "m").vae is not None


def test_bad_option_is_one_line_error_exit_2(tmp_path):
    result = runner.invoke(app, ["init-tiny", str(tmp_path / "m"), "--preset", "sd3"])
    assert result.exit_code == 2
    presets = "tiny, sd15, shapes, inpaint-tiny, sd2-tiny, sd2, sdxl-tiny, sdxl, controlnet-tiny, "
    presets += "controlnet-sdxl-tiny, controlnet-sd15, shapes-controlnet"
    assert result.stderr.splitlines() == [f"error: --preset 'sd3': choose one of {presets}"]
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("delay", [0.15, 0.3, 0.6, 1.2])
def test_ctrl_c_while_the_cli_imports_is_one_line(tmp_path, delay):
    """Ctrl-C at any moment of the first second (imports, then the command) ends the command in one line."""
    import signal
    import time
    from pathlib import Path

    script = Path(sys.executable).with_name("voltacache")
    process = subprocess.Popen(
        [script, "init-tiny", tmp_path / "m"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal starts it
    )
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    # (a Ctrl-C inside click's own parsing can end it silently: still 130 and no traceback)
    assert process.returncode == 130 and stderr in ("error: interrupted\n", ""), stderr


def test_a_command_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path):
    """A background job (`cmd &` in a script) inherits SIGINT ignored: an interrupt is not its to take."""
    import signal
    import time
    from pathlib import Path

    script = Path(sys.executable).with_name("voltacache")
    ignore = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    process = subprocess.Popen(
        [script, "init-tiny", tmp_path / "m"], stderr=subprocess.PIPE, text=True, preexec_fn=ignore
    )
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert (tmp_path / "m" / "model_index.json").is_file()
