"""The `voltacache` console script. Ctrl-C while the CLI is still importing (typer, rich, the commands'
modules: the first few tenths of a second) is held until the imports are done, then ends the command as
any Ctrl-C does: `error: interrupted`, exit 130, never a traceback of half-imported modules."""

import signal
import sys


def main() -> None:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background: Ctrl-C is not ours
        from .cli import main as run

        return run()
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        from .cli import main as run
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130)
    run()
