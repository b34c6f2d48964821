"""Side-by-side timing: contenders alternate within each round, and medians are compared.

Alternating (A B C, A B C, ...) rather than batching (A A A, B B B) spreads machine noise evenly
over the contenders, so the ratios printed are measured in one run, under the same conditions.
"""

from __future__ import annotations

import json
import platform
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def library_versions() -> dict:
    """The versions of what a result was computed with (imported here, not at start-up: torch is heavy)."""
    import diffusers
    import numpy
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }


def alternate(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, progress=None) -> dict:
    """Seconds of each call, per contender: `warmup` untimed rounds, then `repeats` timed ones."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    seconds = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            started = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - started)
            if progress:
                progress(name)
    return seconds


def summarize(seconds: dict[str, list[float]], baseline: str) -> dict:
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        name: {"median_s": medians[name], "runs_s": values, "speedup_vs_" + baseline: medians[baseline] / medians[name]}
        for name, values in seconds.items()
    }


def machine() -> dict:
    """What every result records of the machine: the CPU model and its matrix-unit flags move the ratios."""
    from .runtime.cpu import cpu

    facts = cpu()
    return {
        "cpu": facts["model"],
        "cpu_flags": facts["flags"],
        "cores": facts["cores"],
        "python": platform.python_version(),
    }


def free_port() -> int:
    """A loopback port free now, for a server of a benchmark's (or a test's) own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
