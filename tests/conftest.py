"""Session-wide fixtures: one tiny model per test session, shared by every test that needs one."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a test that reaches for the hub fails instead of hanging


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from voltacache.presets import write_random_pipeline

    return write_random_pipeline(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    from voltacache.checkpoint import load_pipeline

    return load_pipeline(tiny_dir)
