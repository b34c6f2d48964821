"""The `voltacache` command line: one subcommand per stage of checkpoint -> engines -> Triton, in modules by
layer (compile, serve, generate, cache), each command a thin layer over functions a program can call."""

from . import cache, compile, generate, serve  # noqa: F401 (each registers its commands on the app)
from .app import app, main

__all__ = ["app", "main"]
