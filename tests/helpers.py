"""Small helpers the tests share: the CLI as a user runs it, and what a folder holds."""

from __future__ import annotations

import hashlib

PROMPT = "a photo of an astronaut riding a horse"  # the prompt of the parity tests
OTHER_MODELS_PROMPT = PROMPT  # conftest's cached_server holds an entry of another model for it

# Every port a `milvus-server` takes besides its proxy port: a test server needs its own of each.
MILVUS_PORTS = (
    "etcd",
    "root-coord",
    "proxy-internal",
    "query-coord",
    "query-node",
    "index-coord",
    "index-node",
    "data-coord",
    "data-node",
)


def cli(*args):
    """`voltacache ARGS...` in this process (typer's runner: stdout and stderr apart)."""
    from typer.testing import CliRunner

    from voltacache.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, code, *fragments):
    """The failure a user sees: exit `code`, one `error:` line on stderr holding `fragments`, no traceback."""
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(folder):
    """Every file under `folder`, by relative path, with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def diffusers_image(pipe, scheduler, seed, steps=20, guidance=7.5, negative="", pipeline_class=None, **kwargs):
    """diffusers' own image for PROMPT, from a pipeline of its own over `pipe`'s modules (the shared `pipe`
    keeps its scheduler). Our empty negative prompt is diffusers' None: SDXL zeros it
    (force_zeros_for_empty_prompt), SD 1.x/2.x encode "" either way."""
    import torch

    from voltacache.schedulers import make_scheduler

    components = {**pipe.components, "scheduler": make_scheduler(scheduler, dict(pipe.scheduler.config))}
    extra = {"add_watermarker": False} if "XL" in type(pipe).__name__ else {}
    other = (pipeline_class or type(pipe))(**components, **extra)
    other.set_progress_bar_config(disable=True)
    return other(
        PROMPT,
        negative_prompt=negative or None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        **kwargs,
    ).images[0]


def levels(a, b):
    """The largest difference between two uint8 images, in levels, and the share of values that differ."""
    import numpy as np

    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    return diff.max(), (diff > 0).mean()
