"""Errors a user can act on. The CLI prints them without a traceback."""


class VoltacacheError(Exception):
    """Base class: the message names the file or argument and what is wrong."""


class CheckpointError(VoltacacheError):
    """A checkpoint that cannot be loaded: missing, unsupported format or family, pickle refused."""


class ExportError(VoltacacheError):
    """An export whose validation failed."""


class NotBuiltYet(VoltacacheError):
    """A subcommand that a later issue fills."""


def read_json(path, what: str, remedy: str, error=VoltacacheError) -> dict:
    """A JSON file the user's last command wrote; missing or torn, the error names it and the fix."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no {what}; {remedy}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: corrupt {what} ({e}); {remedy}") from e
