import os
import shutil
import signal

import pytest

from voltacache.errors import VoltacacheError
from voltacache.serving.server import TritonServer


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_stop_leaves_no_process(triton_repo, tmp_path, ports):
    repo = shutil.copytree(triton_repo, tmp_path / "repo")
    server = TritonServer(repo, **ports).start()
    pgid = server.process.pid
    server.stop()
    assert server.process.returncode is not None
    assert not group_alive(pgid)  # tritonserver and every Python-backend stub are gone


def test_broken_model_fails_with_the_log(triton_repo, tmp_path, ports):
    repo = shutil.copytree(triton_repo, tmp_path / "repo")
    (repo / "postprocess" / "1" / "model.py").write_text("raise RuntimeError('broken adapter')\n")
    server = TritonServer(repo, log_file=tmp_path / "log.txt", **ports)
    with pytest.raises(VoltacacheError, match="tritonserver exited.*log"):
        server.start()
    assert not group_alive(server.process.pid)


def test_sigterm_to_serve_stops_everything(triton_repo, tmp_path, ports):
    import subprocess
    import sys
    import time

    repo = shutil.copytree(triton_repo, tmp_path / "repo")
    p = ports
    cmd = [
        sys.executable,
        "-m",
        "voltacache",
        "serve",
        "--repo",
        str(repo),
        "--http-port",
        str(p["http_port"]),
        "--grpc-port",
        str(p["grpc_port"]),
        "--metrics-port",
        str(p["metrics_port"]),
    ]
    serve = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = ""
    deadline = time.monotonic() + 120
    while "ready" not in line and time.monotonic() < deadline:
        line = serve.stderr.readline()
    assert "ready" in line
    assert f"127.0.0.1:{p['grpc_port']}" in line + serve.stderr.readline()
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(60) == 0
    assert "stopped" in serve.stderr.read()
