"""The one error family of voltacache: every failure a user can act on is one of these.

Raise them where the setting or file is read or written, with a message that names the argument
or file and what to do. The CLI prints `error: <message>` as one line on stderr and exits with the
class's `exit_code` (2: the command line asks for something invalid; 1: it failed); a traceback
only with `--debug`. In Triton the same messages become the request's error response.
"""

from __future__ import annotations


class VoltacacheError(Exception):
    """Base class: the message names the file or argument and what is wrong."""

    exit_code = 1


class UsageError(VoltacacheError):
    """The command line or request asks for something invalid: change it and run again."""

    exit_code = 2


class InvalidRequest(UsageError):
    """A generation request rejected before any compute; the message names the field."""


class BadConfiguration(UsageError):
    """A setting (cache policy, embedder, bands, index URI, instance count, ...) that cannot work,
    refused when it is written, not when a server loads it."""


class OutputExists(UsageError):
    """An output would replace something: pass --force (for what voltacache wrote), or name another path."""


class CheckpointError(VoltacacheError):
    """A checkpoint that cannot be loaded: missing, corrupt, unsupported format or family, pickle refused."""


class ExportError(VoltacacheError):
    """An export whose input or validation failed."""


class RebuildNeeded(VoltacacheError):
    """Engines that do not match this runtime, GPU or export: rebuild them."""


class ServerFailed(VoltacacheError):
    """tritonserver did not start, or a server cannot be reached."""


class CacheUnavailable(VoltacacheError):
    """A cache index or blob store that cannot be opened or read. Generation goes on without it."""


def read_json(path, what: str, remedy: str, error=VoltacacheError) -> dict:
    """A JSON file the user's last command wrote; missing or torn, the error names it and the fix."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no {what}; {remedy}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: corrupt {what} ({e}); {remedy}") from e
