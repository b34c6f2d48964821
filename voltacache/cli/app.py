"""The `voltacache` command line's shared parts: the app, one-line errors (`user_errors`, `main`), the quiet
third parties, and the options several commands take. The commands are in the modules beside this one,
each a thin layer over functions a program can call."""

from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings

import typer
from rich.console import Console

from ..cache.layers import DEFAULT_BANDS, NIRVANA_BANDS, CacheConfig
from ..errors import VoltacacheError

app = typer.Typer(
    help="Compile Stable Diffusion to ONNX / TensorRT engines and serve it from Triton with caching.",
    no_args_is_help=True,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect and manage the cross-request cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
err = Console(stderr=True)


DEBUG = {"on": False}  # --debug: let tracebacks through
# Known-harmless chatter of the libraries below us (diffusers' and transformers' loading bars, transformers'
# advice to install torchvision, which would replace the CPU torch): off unless --debug. Our own progress
# bars (rich) stay. Set before those libraries import, and inherited by the servers a command starts.
QUIET_THIRD_PARTIES = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
# A warning is one line too ("warning: ..."), not Python's two with the source line.
warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of a failure."),
):
    """Compile Stable Diffusion to ONNX / TensorRT engines and serve it from Triton with caching."""
    DEBUG["on"] = debug
    if not debug:
        quiet_third_parties()


def quiet_third_parties() -> None:
    import logging

    for key, value in QUIET_THIRD_PARTIES.items():
        os.environ.setdefault(key, value)
    # the variables are read at import: a library already imported (the CLI called from Python) is told
    for name in ("diffusers", "transformers"):
        if name in sys.modules:
            library = importlib.import_module(f"{name}.utils.logging")
            library.set_verbosity_error()
            library.disable_progress_bar()
    # torch.onnx's exporter says, for each graph, that torchvision's ops are not registered (we have none)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    # and torch's own pytree deprecation, raised inside torch.export
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def fail(message: str, code: int, details: str = "") -> typer.Exit:
    """One line on stderr (then any details, such as the log lines that say why a server failed)."""
    print("error: " + " ".join(str(message).split("\n")), file=sys.stderr)
    if details:
        print(details, file=sys.stderr)
    return typer.Exit(code)


def user_errors(fn):
    """The CLI's edge: every failure is one line on stderr and an exit code (2 usage, 1 failure,
    130 interrupted); a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except VoltacacheError as e:
            if DEBUG["on"]:
                raise
            raise fail(str(e), e.exit_code, getattr(e, "details", "")) from None
        except KeyboardInterrupt:
            if DEBUG["on"]:
                raise
            raise fail("interrupted", 130) from None
        except Exception as e:  # a bug or an unforeseen failure: still one line, the traceback on request
            if DEBUG["on"]:
                raise
            raise fail(f"unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", 1) from None

    return wrapper


CACHE_THRESHOLD = typer.Option(
    CacheConfig.semantic_threshold, help="Cache: the similarity from which a stored image is served."
)
CACHE_BANDS = typer.Option(
    DEFAULT_BANDS,
    help="Cache: SIMILARITY:FRACTION,... a match this similar starts FRACTION of the steps in from its latent "
    f"(NIRVANA's own: {NIRVANA_BANDS}).",
)


def main():
    """The entry point: every failure one line, exit 2 for a command line that cannot be parsed (click's
    own messages, folded into one line), 130 for Ctrl-C."""
    import signal

    from typer._click import exceptions as parsing  # typer 0.29 carries its own click (pyproject pins it)

    try:
        try:
            code = app(standalone_mode=False)
        finally:  # the command is over, its outputs whole: a late Ctrl-C must not change what it did or say more
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except parsing.NoArgsIsHelpError as e:
        print(e.format_message())
        code = 2
    except parsing.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        print("error: " + " ".join(e.format_message().split()) + hint, file=sys.stderr)
        code = 2
    except typer.Abort:  # Ctrl-C while the command line was read
        print("error: interrupted", file=sys.stderr)
        code = 130
    except typer.Exit as e:
        code = e.exit_code
    except KeyboardInterrupt:  # between the command's end and here
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)
