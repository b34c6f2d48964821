import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from helpers import cli

from voltacache.errors import ServerFailed
from voltacache.serving.server import TritonServer

pytestmark = pytest.mark.triton  # tritonserver, started here or through `voltacache serve`

# A model that logs what a degraded denoiser logs (its cache cannot be opened), then loads as usual.
WARNING_MODEL = """import triton_python_backend_utils as pb_utils

from voltacache.serving.python_models import PostprocessModel


class TritonPythonModel(PostprocessModel):
    def initialize(self, args):
        pb_utils.Logger.log_warn("voltacache warning: test cache cannot be opened; serving without it")
        super().initialize(args)
"""


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def shm_regions(prefix: str) -> list:
    return sorted(Path("/dev/shm").glob(f"{prefix}*"))


def serve_command(repo, ports, *extra) -> list:
    options = [f"--{name.replace('_', '-')}={port}" for name, port in ports.items()]
    return [sys.executable, "-m", "voltacache", "serve", f"--repo={repo}", *options, *extra]


def serve_fails(repo, ports, timeout=60) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run `voltacache serve` to its end: (result, seconds it took, its pid)."""
    began = time.monotonic()
    process = subprocess.Popen(serve_command(repo, ports), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # it started a server: stop it, and all it started
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        raise
    result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return result, time.monotonic() - began, process.pid


def one_error_line(result) -> str:
    """The `error:` line, checked to be the first line on stderr and the only one."""
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("error: "), result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.triton
def test_stop_leaves_no_process(triton_repo, tmp_path, ports):
    repo = shutil.copytree(triton_repo, tmp_path / "repo")
    server = TritonServer(repo, **ports).start()
    pgid = server.process.pid
    assert shm_regions(server.shm_prefix)  # the stubs use this server's own prefix
    assert server.log.is_file()  # no log_file: a temporary one all the same
    server.stop()
    assert server.process.returncode is not None
    assert not group_alive(pgid)  # tritonserver and every Python-backend stub are gone
    assert not shm_regions(server.shm_prefix)
    assert not server.log.exists()  # a clean stop leaves no temporary log behind


@pytest.mark.triton
def test_broken_model_fails_with_the_log(triton_repo, tmp_path, ports):
    repo = shutil.copytree(triton_repo, tmp_path / "repo")
    (repo / "postprocess" / "1" / "model.py").write_text("raise RuntimeError('broken adapter')\n")
    server = TritonServer(repo, log_file=tmp_path / "log.txt", **ports)
    with pytest.raises(ServerFailed, match="model 'postprocess' failed to load.*log") as failure:
        server.start()
    assert "broken adapter" in failure.value.details
    assert not group_alive(server.process.pid)
    assert not shm_regions(server.shm_prefix)


def test_serve_refuses_a_missing_repository(tmp_path, ports):
    result, seconds, _ = serve_fails(tmp_path / "missing", ports)
    assert result.returncode == 2
    assert f"--repo {tmp_path / 'missing'}: no such folder" in one_error_line(result)
    assert seconds < 10


@pytest.mark.parametrize("remove_marker", [False, True], ids=["empty", "not-deployed"])
def test_serve_refuses_a_folder_not_written_by_deploy(triton_repo, tmp_path, ports, remove_marker):
    """An empty folder would start a server ready with no models; a Triton repository that deploy did
    not write would serve without what voltacache needs."""
    if remove_marker:
        repo = shutil.copytree(triton_repo, tmp_path / "repo")
        (repo / "voltacache.json").unlink()
    else:
        repo = tmp_path / "repo"
        repo.mkdir()
    result, seconds, _ = serve_fails(repo, ports)
    assert result.returncode == 2
    line = one_error_line(result)
    assert f"--repo {repo} is not a repository written by `voltacache deploy`" in line
    assert seconds < 10


@pytest.mark.parametrize("busy", ["http_port", "grpc_port", "metrics_port"])
def test_serve_refuses_a_busy_port(triton_repo, ports, busy):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[busy]))
        taken.listen()
        result, seconds, _ = serve_fails(triton_repo, ports)
    option = "--" + busy.replace("_", "-")
    assert result.returncode == 2
    assert one_error_line(result) == f"error: {option} {ports[busy]} is in use on 127.0.0.1; pick another"
    assert seconds < 10


def test_a_host_that_is_not_this_machines_says_what_to_give(ports):
    from voltacache.errors import UsageError
    from voltacache.serving.server import check_port

    with pytest.raises(UsageError, match=r"^--host 10.255.255.1: not an address of this machine .*127.0.0.1"):
        check_port("--http-port", "10.255.255.1", ports["http_port"])


@pytest.mark.triton
def test_serve_names_the_model_that_failed_to_load(triton_repo, tmp_path, ports):
    repo = shutil.copytree(triton_repo, tmp_path / "repo")
    (repo / "postprocess" / "1" / "model.py").write_text("raise RuntimeError('broken adapter')\n")
    result, seconds, pid = serve_fails(repo, ports, timeout=120)  # no --log-file
    assert result.returncode == 1
    line = one_error_line(result)
    assert "model 'postprocess' failed to load" in line
    log = Path(line.rsplit("the log is ", 1)[1])
    assert log.is_file()  # kept, since it failed
    log.unlink()
    details = result.stderr.splitlines()[1:]
    assert any("failed to load 'postprocess'" in d and "broken adapter" in d for d in details), result.stderr
    assert not any("Timeout" in d or "unloaded" in d for d in details)  # the reasons, not the shutdown
    assert not shm_regions(f"voltacache{pid}_")
    print(f"the error after {seconds:.1f} s")


@pytest.mark.triton
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_the_start_stops_at_once(triton_repo, tmp_path, ports, sig):
    repo = shutil.copytree(triton_repo, tmp_path / "repo")
    serve = subprocess.Popen(serve_command(repo, ports), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    # mid-start: the first stubs are up, the models not all loaded
    while not shm_regions(f"voltacache{serve.pid}_") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shm_regions(f"voltacache{serve.pid}_"), "no stub started"
    (tritonserver,) = children(serve.pid)
    began = time.monotonic()
    serve.send_signal(sig)
    assert serve.wait(30) == 128 + sig
    print(f"{sig.name}: exited after {time.monotonic() - began:.1f} s")
    assert time.monotonic() - began < 10
    _, err = serve.communicate()
    assert err.splitlines() == [f"error: interrupted by {sig.name} while tritonserver was starting; stopped it"]
    assert not group_alive(tritonserver)
    assert not shm_regions(f"voltacache{serve.pid}_")


@pytest.mark.triton
def test_sigterm_to_serve_stops_everything(triton_repo, tmp_path, ports):
    repo = shutil.copytree(triton_repo, tmp_path / "repo")
    (repo / "postprocess" / "1" / "model.py").write_text(WARNING_MODEL)
    p = ports
    serve = subprocess.Popen(serve_command(repo, ports), stderr=subprocess.PIPE, text=True)
    line = ""
    deadline = time.monotonic() + 120
    while "ready" not in line and time.monotonic() < deadline:
        line = serve.stderr.readline()
    assert "ready" in line and f"127.0.0.1:{p['grpc_port']}" in line  # one line, however wide
    (tritonserver,) = children(serve.pid)
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(60) == 0
    rest = serve.stderr.read().splitlines()
    # what the models warned of while loading is shown, once, before the stop
    assert rest == ["voltacache warning: test cache cannot be opened; serving without it", "tritonserver stopped"]
    assert not group_alive(tritonserver)
    assert not shm_regions(f"voltacache{serve.pid}_")


def wait_ready(serve, timeout=120) -> list[str]:
    """stderr lines of `voltacache serve` until it says it is ready."""
    lines, deadline = [], time.monotonic() + timeout
    while not (lines and "ready" in lines[-1]) and time.monotonic() < deadline:
        lines.append(serve.stderr.readline())
    assert "ready" in lines[-1], lines
    return lines


@pytest.mark.triton
def test_a_server_never_outlives_serve_killed_hard(triton_repo, tmp_path, ports):
    """SIGKILL (the OOM killer) gives serve no chance to stop anything: the kernel stops its tritonserver
    (PR_SET_PDEATHSIG), which unloads its models and ends its stubs; ports and shared memory come back."""
    from voltacache.serving.server import servers_of

    repo = shutil.copytree(triton_repo, tmp_path / "repo")
    serve = subprocess.Popen(serve_command(repo, ports), stderr=subprocess.PIPE, text=True)
    wait_ready(serve)
    (tritonserver,) = children(serve.pid)
    assert [s.pid for s in servers_of(repo)] == [tritonserver]
    serve.kill()
    serve.wait()
    deadline = time.monotonic() + 60
    while group_alive(tritonserver) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(tritonserver), "tritonserver outlived voltacache serve"
    assert not shm_regions(f"voltacache{serve.pid}_")
    assert servers_of(repo) == []


@pytest.mark.triton
def test_serve_stops_a_server_a_killed_serve_left_and_names_a_running_one(triton_repo, engines_dir, tmp_path, ports):
    """A leftover of an earlier `voltacache serve` (its starter gone, our shared-memory prefix: provably
    ours) is stopped with a word; a server another serve runs stays, and holding a port it is named; a
    deploy over the repository it serves says that server goes on with what it loaded."""
    from voltacache.serving.server import servers_of

    repo = shutil.copytree(triton_repo, tmp_path / "repo")
    # what a tritonserver started without the parent-death tie is left as when its starter is SIGKILLed
    leave = (
        "import subprocess, sys\n"
        "from voltacache.serving.server import TritonServer\n"
        f"cmd, env = TritonServer({str(repo)!r}, **{ports!r}).command()\n"
        "p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL)\n"
        "print(p.pid)\n"
    )
    leftover = int(subprocess.run([sys.executable, "-c", leave], capture_output=True, text=True).stdout)
    deadline = time.monotonic() + 60
    while not servers_of(repo) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [s.orphaned for s in servers_of(repo)] == [True]
    serve = subprocess.Popen(serve_command(repo, ports), stderr=subprocess.PIPE, text=True)
    try:
        lines = wait_ready(serve)
        assert any(f"stopped tritonserver pid {leftover}" in line and "was killed" in line for line in lines), lines
        assert not group_alive(leftover)
        result, seconds, _ = serve_fails(repo, ports)
        (running,) = children(serve.pid)
        assert result.returncode == 2 and seconds < 10
        line = one_error_line(result)
        assert f"is in use on 127.0.0.1 by tritonserver pid {running} (serving {repo.resolve()}" in line
        assert f"kill {running}" in line
        said = f"tritonserver pid {running} serves --repo {repo} with the models it loaded before"
        with warnings.catch_warnings(record=True) as warned:  # the CLI prints each: "warning: ..."
            warnings.simplefilter("always")
            redeploy = cli("deploy", "--engines", engines_dir, "--repo", repo)
        assert redeploy.exit_code == 0, redeploy.output
        assert any(said in str(w.message) for w in warned), (redeploy.output, [str(w.message) for w in warned])
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--http-port", "99999", "--http-port 99999: a port is a number from 1 to 65535"),
        ("--metrics-port", "0", "--metrics-port 0: a port is a number from 1 to 65535"),
    ],
)
def test_serve_checks_every_argument_before_starting_anything(triton_repo, tmp_path, ports, option, value, words):
    from voltacache.serving.server import servers_of

    repo = shutil.copytree(triton_repo, tmp_path / "repo")
    command = [a for a in serve_command(repo, ports) if not a.startswith(option)] + [f"{option}={value}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert words in one_error_line(result)
    assert servers_of(repo) == []  # nothing was started, so nothing is left


def test_serve_says_where_engines_went(engines_dir, tmp_path, ports):
    from voltacache.serving.deploy import deploy

    engines = shutil.copytree(engines_dir, tmp_path / "engines")
    repo = deploy(engines, tmp_path / "repo")
    engines.rename(tmp_path / "moved")
    result, seconds, _ = serve_fails(repo, ports)
    assert result.returncode == 2 and seconds < 10
    line = one_error_line(result)
    assert f"--repo {repo}: its engines {engines} are gone (moved or deleted)" in line
    assert "voltacache deploy --engines" in line
