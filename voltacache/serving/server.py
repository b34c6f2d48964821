"""Start and stop tritonserver: a `tritonserver` on PATH (the NGC container) or the CPU build pytriton bundles.

The bundled build needs three things (docs/platform.md): a backend folder holding the Python-backend
stub built for this venv's Python, the bundled libraries and this Python's LIBDIR on
LD_LIBRARY_PATH (else the stub loads the system's older libpython), and the venv's bin first on
PATH (else the models cannot import numpy or voltacache).
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from ..errors import ServerFailed, UsageError, VoltacacheError
from ..outputs import check_writable
from .protocol import REPOSITORY_MARKER

READY_TIMEOUT_S = 120
WARNING = "voltacache warning:"  # what a model logs when it serves in a degraded way
_numbers = itertools.count(1)
_LOG_LINE = re.compile(r"^([IWE])\d{4} \S+\s+\d+ [^\]]*\] (.*)$")
# A model that will not load (its files, or its config); fatal with --exit-on-error.
_FAILED_LOAD = re.compile(r"(?:failed to load|Poll failed for model directory) '([^']+)'")
# Logged as an error by every start of the CPU build: never the reason a start failed.
_NOISE = ("CudaDriverHelper has not been initialized",)


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


def preflight(repo: Path, host: str, ports: dict[str, int], log_file: Path | None = None) -> None:
    """Refuse in milliseconds what tritonserver would fail on only after loading models, or not at
    all: an empty folder is a repository it serves, ready, with no models. Every argument is checked
    before anything starts."""
    repo = Path(repo)
    if not repo.exists():
        raise UsageError(f"--repo {repo}: no such folder; write one with `voltacache deploy`")
    if not repo.is_dir():
        raise UsageError(f"--repo {repo}: a file, not a folder; give the folder `voltacache deploy --repo` wrote")
    check_servable_path(repo, "--repo")
    try:
        engines = Path(json.loads((repo / REPOSITORY_MARKER).read_text())["engines"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"--repo {repo} is not a repository written by `voltacache deploy` (no {REPOSITORY_MARKER}); "
            "pass the folder `voltacache deploy --repo` wrote"
        ) from None
    if not (engines / "engines.json").is_file():
        raise UsageError(
            f"--repo {repo}: its engines {engines} are gone (moved or deleted); run `voltacache deploy "
            f"--engines <where they are now> --repo {repo}` again"
        )
    taken = {}
    for option, port in ports.items():
        check_port_number(option, port)
        if port in taken:
            raise UsageError(f"{option} {port} is also the {taken[port]}; pick another")
        taken[port] = option
    if log_file is not None:
        if Path(log_file).is_dir():
            raise UsageError(f"--log-file {log_file}: a folder; name a file for tritonserver's log")
        check_writable(Path(log_file), "--log-file")
    stop_leftovers(repo)
    for option, port in ports.items():
        check_port(option, host, port)


def check_servable_path(repo: Path, arg: str) -> None:
    """Triton's Python-backend stubs take the model repository's path split at whitespace: a repository
    whose path holds a space never loads (the stubs crash, the server waits out its timeout)."""
    resolved = str(Path(repo).resolve())
    if any(c.isspace() for c in resolved):
        raise UsageError(
            f"{arg} {repo}: its path holds whitespace ({resolved!r}), which Triton's Python backend cannot load "
            "models from; name a path without spaces"
        )


def check_port_number(option: str, port) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"{option} {port}: a port is a number from 1 to 65535")


def check_port(option: str, host: str, port: int) -> None:
    """Refuse a port that is in use on `host`, or an address that cannot be bound, naming the option."""
    check_port_number(option, port)
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, kind) as probe:
        # As tritonserver binds: a port the last server left in TIME_WAIT is free. Without
        # SO_REUSEPORT, which gRPC sets: a second server would share the port of a running one.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"{option} {port} is in use on {host}{holder(port)}; pick another") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UsageError(
                    f"--host {host}: not an address of this machine ({e.strerror}); give one of its own, "
                    "127.0.0.1 (the default) or 0.0.0.0 for every interface"
                ) from None
            raise UsageError(f"{option} {port} on --host {host}: cannot bind ({e.strerror}); pick another") from None


SHM_PREFIX = re.compile(r"shm-region-prefix-name=voltacache(\d+)_")


@dataclass(frozen=True)
class RunningServer:
    """A tritonserver process found on this machine serving a repository."""

    pid: int
    parent: int  # its parent process (1 or a subreaper once that parent died)
    started_by: int | None  # the pid of the voltacache process that started it (its shared-memory prefix)
    ports: dict
    repository: str = ""

    @property
    def orphaned(self) -> bool:
        """Started by a voltacache process that is gone (killed hard: nothing stopped its server)."""
        return self.started_by is not None and self.parent != self.started_by and not _alive(self.started_by)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def servers_of(repo: Path | None) -> list[RunningServer]:
    """The tritonserver processes serving `repo` (every one for None), read from /proc: their command lines."""
    wanted = f"--model-repository={Path(repo).resolve()}" if repo is not None else None
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if not args[0].endswith("tritonserver") or (wanted is not None and wanted not in args):
            continue
        prefix = next((m for m in map(SHM_PREFIX.search, args) if m), None)
        ports = {a.split("=")[0][2:]: a.split("=", 1)[1] for a in args if re.match(r"--\w+-port=", a)}
        repository = next((a.split("=", 1)[1] for a in args if a.startswith("--model-repository=")), "")
        found.append(RunningServer(int(proc.name), parent, int(prefix.group(1)) if prefix else None, ports, repository))
    return found


def stop_leftovers(repo: Path) -> None:
    """A tritonserver a hard-killed `voltacache serve` left serving this repository is stopped: it is
    provably ours (our shared-memory prefix, its starter gone). Servers another serve runs stay; one that
    holds a port this start needs is named by the port check."""
    for server in servers_of(repo):
        if server.orphaned:
            ports = ", ".join(f"{k} {v}" for k, v in server.ports.items())
            try:
                _stop_group(server.pid)
            except PermissionError:
                continue  # not ours to stop after all
            warnings.warn(
                f"stopped tritonserver pid {server.pid} ({ports}): left serving {repo} by a voltacache serve "
                f"(pid {server.started_by}) that was killed",
                stacklevel=2,
            )


def holder(port: int) -> str:
    """Which tritonserver (if one) was started on `port`, for the error that says the port is taken."""
    for server in servers_of(None):
        if str(port) in server.ports.values():
            return f" by tritonserver pid {server.pid} (serving {server.repository}; kill {server.pid} to stop it)"
    return ""


def _stop_group(pid: int, timeout: float = 30) -> None:
    """SIGTERM to a server's process group (it unloads its models, stops its stubs), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def die_with_parent(parent: int) -> None:
    """In the child before exec: the kernel sends it SIGTERM when the process that started it dies,
    even by SIGKILL (PR_SET_PDEATHSIG), so a server never outlives its command."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the call took effect
        os._exit(1)


def _message(line: str) -> tuple[str, str]:
    """(severity, message) of a tritonserver log line, its quoted message unescaped; ("", line) for
    anything else written to the log (the stubs' own output)."""
    match = _LOG_LINE.match(line)
    if not match:
        return "", line
    severity, text = match.groups()
    if len(text) > 1 and text[0] == text[-1] == '"':
        try:
            text = json.loads(text, strict=False)
        except ValueError:
            pass
    return severity, text


@dataclass
class TritonServer:
    """A tritonserver process on a model repository; a context manager that always stops it.

    Its log goes to `log_file`, else to a temporary file removed after a clean stop and kept (and
    named in the error) when it fails."""

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
    # Python-backend shared-memory regions are /dev/shm/<prefix>*: one prefix per server, so that
    # cleaning up after a server touches no other server's regions.
    shm_prefix: str = field(init=False, default_factory=lambda: f"voltacache{os.getpid()}_{next(_numbers)}_")
    log: Path | None = field(init=False, default=None)
    _log_start: int = field(init=False, default=0)  # a --log-file is appended to: read this run only

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
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if backends:
            cmd += [f"--backend-directory={backends}", f"--cache-directory={backends.parent / 'caches'}"]
        return cmd + list(self.extra_args), env

    def start(self, timeout: float = READY_TIMEOUT_S, cancelled: Callable[[], bool] = lambda: False) -> TritonServer:
        """Start and wait until it serves. A failed start leaves nothing running and raises
        ServerFailed with the log lines that say why as `details`. Once `cancelled()` (a signal
        came) the start stops at once and raises KeyboardInterrupt."""
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        preflight(self.repo, self.host, ports, self.log_file)
        cmd, env = self.command()
        if self.log_file:
            self.log = Path(self.log_file)
            self._log_start = self.log.stat().st_size if self.log.is_file() else 0
        else:
            handle, name = tempfile.mkstemp(prefix="voltacache-tritonserver-", suffix=".log")
            os.close(handle)
            self.log = Path(name)
        with open(self.log, "ab") as log:
            # Its own process group, so a stop reaches the Python-backend stubs too.
            self.process = subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, os.getpid()),
            )
        try:
            self.wait_ready(timeout, cancelled)
        except KeyboardInterrupt:  # cancelled, or a Ctrl-C where Python's own handler is on
            self.kill()
            self._drop_log()  # nothing failed: the user stopped it
            raise
        return self

    def wait_ready(self, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> None:
        import tritonclient.http as http

        deadline = time.monotonic() + timeout
        while True:
            if cancelled():
                raise KeyboardInterrupt("tritonserver start interrupted")
            if self.process.poll() is not None:
                self.fail(f"tritonserver exited with code {self.process.returncode}")
            # --exit-on-error: a model that failed to load ends the start, but only once every
            # other model has loaded and been unloaded again (half a minute here). End it now.
            if any(_FAILED_LOAD.search(text) for _, text in self.log_messages("E")):
                self.fail("tritonserver did not start")
            if time.monotonic() > deadline:
                self.fail(f"tritonserver not ready after {timeout:.0f} s")
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

    def metrics_answer(self) -> bool:
        if "--allow-metrics=false" in self.extra_args:
            return True
        with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
            return response.status == 200

    def log_messages(self, severity: str | None = None) -> list[tuple[str, str]]:
        """This run's complete log lines as (severity, message); only those of `severity` if given."""
        if self.log is None or not self.log.is_file():
            return []
        with open(self.log, "rb") as f:
            f.seek(self._log_start)
            lines = f.read().decode(errors="replace").split("\n")[:-1]  # the last one may be half written
        messages = [_message(line) for line in lines]
        return [m for m in messages if severity is None or m[0] == severity]

    def warnings(self) -> list[str]:
        """The `voltacache warning:` lines the models logged while loading, each once."""
        found = [text[text.index(WARNING) :].splitlines()[0] for _, text in self.log_messages() if WARNING in text]
        return list(dict.fromkeys(found))

    def fail(self, cause: str) -> NoReturn:
        """Stop what started and raise: the models that failed to load, else `cause`; the errors
        tritonserver logged (else the log's last lines) as the details."""
        self.kill()
        errors = [text for _, text in self.log_messages("E") if not any(n in text for n in _NOISE)]
        failed = list(dict.fromkeys(m.group(1) for m in map(_FAILED_LOAD.search, errors) if m))
        last = [text for _, text in self.log_messages("") if text.startswith("error: ")]
        if failed:
            cause = f"tritonserver did not start: {'models' if len(failed) > 1 else 'model'} "
            cause += f"{', '.join(map(repr, failed))} failed to load"
        elif last:  # tritonserver's own last word, when it exited by itself
            cause += f" ({last[-1].removeprefix('error: ')})"
        error = ServerFailed(f"{cause}; the log is {self.log}")
        error.details = "\n".join(errors or [text for _, text in self.log_messages()][-15:])
        raise error

    def stop(self, timeout: float = 30) -> None:
        """Stop gracefully: in-flight requests finish, the models unload."""
        if self.process is None:
            return
        stopped_by_us = self.process.poll() is None
        # SIGTERM to tritonserver alone: it unloads its models and stops their stubs itself (a
        # stub killed under it makes it wait out its exit timeout). Then nothing of the group survives.
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill(timeout)
        if stopped_by_us:  # not a failure, even when unloading outlasted the exit timeout (exit code 1)
            self._drop_log()

    def _drop_log(self) -> None:
        if not self.log_file and self.log is not None:
            self.log.unlink(missing_ok=True)

    def kill(self, timeout: float = 30) -> None:
        """End the whole process group now (a failed or interrupted start: nothing to drain, and a
        SIGTERM would wait for the models still loading), then remove its shared memory."""
        if self.process is None:
            return
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
                break
            time.sleep(0.05)
        # A killed stub (or tritonserver) never unlinks its regions: they would hold memory until reboot.
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()


class StartInterrupted(KeyboardInterrupt):
    """A signal came while tritonserver was starting; what started is stopped. `.signal` names it."""


def serve_until_signalled(server: TritonServer, on_ready: Callable[[TritonServer], None]) -> None:
    """`voltacache serve`: start the server, `on_ready(server)`, then serve until SIGINT or SIGTERM and stop
    it (in-flight requests finish). StartInterrupted if the signal came during the start; ServerFailed if
    the server exits by itself."""
    signals = []  # the handler only records: a lock taken in a signal handler can deadlock the main thread
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: signals.append(signum))
    try:
        server.start(cancelled=lambda: bool(signals))
    except KeyboardInterrupt:  # start() has stopped all it started
        interrupted = StartInterrupted()
        interrupted.signal = signal.Signals(signals[0] if signals else signal.SIGINT)
        raise interrupted from None
    with server:
        on_ready(server)
        while not signals and server.process.poll() is None:
            time.sleep(0.25)
    if not signals:
        raise ServerFailed(f"tritonserver exited by itself (code {server.process.returncode}); the log is {server.log}")
