"""Start and stop tritonserver: a `tritonserver` on PATH (the NGC container) or the CPU build pytriton bundles.

The bundled build needs three things (DESIGN.md Part B): a backend folder holding the Python-backend
stub built for this venv's Python, the bundled libraries and this Python's LIBDIR on
LD_LIBRARY_PATH (else the stub loads the system's older libpython), and the venv's bin first on
PATH (else the models cannot import numpy or voltacache).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VoltacacheError

READY_TIMEOUT_S = 120


def _pytriton_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise VoltacacheError(
            "no tritonserver on PATH and nvidia-pytriton is not installed (pip install nvidia-pytriton)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_server_dir() -> Path:
    """A copy of pytriton's tritonserver with this Python's backend stub in backends/python (made once)."""
    source = _pytriton_dir() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise VoltacacheError(f"{stub}: pytriton ships no Python-backend stub for Python {version}")
    import pytriton

    target = Path.home() / ".cache" / "voltacache" / f"tritonserver-{pytriton.__version__}-py{version}"
    if not (target / "backends" / "python" / stub.name).is_file():
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy2(stub, staging / "backends" / "python" / stub.name)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a half-copied server is never used
    return target


def server_environment() -> dict:
    env = dict(os.environ)
    libs = [str(_pytriton_dir().parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*filter(None, libs), env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


@dataclass
class TritonServer:
    """A tritonserver process on a model repository; a context manager that always stops it."""

    repo: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    cache_bytes: int = 64 * 1024 * 1024
    log_file: Path | None = None
    exit_timeout_s: int = 10  # how long a stop waits for in-flight requests and open connections
    extra_args: list = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> tuple[list[str], dict]:
        on_path = shutil.which("tritonserver")
        if on_path:
            binary, backends, env = on_path, None, dict(os.environ)
        else:
            server = bundled_server_dir()
            binary, backends, env = str(server / "bin" / "tritonserver"), server / "backends", server_environment()
        cmd = [
            binary,
            f"--model-repository={Path(self.repo).resolve()}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--cache-config=local,size={self.cache_bytes}",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
        ]
        if backends:
            cmd += [f"--backend-directory={backends}", f"--cache-directory={backends.parent / 'caches'}"]
        return cmd + list(self.extra_args), env

    def start(self, timeout: float = READY_TIMEOUT_S) -> TritonServer:
        cmd, env = self.command()
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        # Its own process group, so stop() reaches the Python-backend stubs too.
        self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import tritonclient.http as http

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()  # stubs of models that did load may outlive it
                raise VoltacacheError(f"tritonserver exited with code {self.process.returncode}{self._log_hint()}")
            # A fresh connection each time, closed: an open one holds up the server's shutdown.
            client = http.InferenceServerClient(self.http_url)
            try:
                # tritonserver opens its metrics port after the HTTP one: a caller that scrapes
                # metrics right away must not race it
                if client.is_server_ready() and self.metrics_answer():
                    return
            except Exception:  # not listening yet
                pass
            finally:
                client.close()
            time.sleep(0.25)
        self.stop()
        raise VoltacacheError(f"tritonserver not ready after {timeout:.0f} s{self._log_hint()}")

    def metrics_answer(self) -> bool:
        if "--allow-metrics=false" in self.extra_args:
            return True
        with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
            return response.status == 200

    def _log_hint(self) -> str:
        if not self.log_file or not Path(self.log_file).is_file():
            return ""
        tail = Path(self.log_file).read_text(errors="replace").strip().splitlines()[-15:]
        return f"; the log ({self.log_file}) ends:\n" + "\n".join(tail)

    def stop(self, timeout: float = 30) -> None:
        if self.process is None:
            return
        # SIGTERM to tritonserver alone: it unloads its models and stops their stubs itself (a
        # stub killed under it makes it wait out its exit timeout). Then nothing of the group survives.
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        # SIGKILL is delivered at once but a stub's teardown is not: on a busy machine the group
        # outlived this call. Return only once it is gone.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()
