"""Errors a user can act on. The CLI prints them without a traceback."""


class VoltacacheError(Exception):
    """Base class: the message names the file or argument and what is wrong."""


class CheckpointError(VoltacacheError):
    """A checkpoint that cannot be loaded: missing, unsupported format or family, pickle refused."""


class ExportError(VoltacacheError):
    """An export whose validation failed."""


class NotBuiltYet(VoltacacheError):
    """A subcommand that a later issue fills."""
