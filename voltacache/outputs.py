"""Write an output so that a failure never leaves it half-written and nothing a user owns is lost.

Every command writes into a temporary sibling of its output (`.<name>.tmp-<pid>` beside it) and
renames that into place only once everything succeeded: a failure or Ctrl-C removes the sibling
and leaves the previous output whole. An existing output is replaced only when voltacache wrote it
(`ours(path)`: its marker file is there) and the caller asked for it (`--force`); an empty folder
may be written into; anything else is refused, --force or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputExists, UsageError

Ours = Callable[[Path], bool]


def json_marker(name: str, *keys: str) -> Ours:
    """`ours` for a folder voltacache wrote: `name` at its root, a JSON object with these keys."""

    def ours(folder: Path) -> bool:
        try:
            data = json.loads((Path(folder) / name).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(key in data for key in keys)

    ours.marker = name
    return ours


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def check_target(
    target: str | Path, *, force: bool, ours: Ours, arg: str = "--out", what: str = "output", file: bool = False
) -> Path:
    """Refuse a target that may not be written; returns it as an absolute path.

    Fine: nothing there, an empty folder (not for `file`), or what `ours` recognizes with `force`.
    """
    target = Path(os.path.abspath(target))
    kind = "file" if file else "folder"
    if not target.name:
        raise UsageError(f"{arg} {target}: name a {kind} to write the {what} into")
    if target.is_symlink():
        raise OutputExists(f"{arg} {target}: a symbolic link; name the {kind} it points to, or another path")
    if not target.exists():
        return target
    if file and target.is_dir():
        raise OutputExists(f"{arg} {target}: a folder, not a file; name a file for the {what}")
    if not file:
        if not target.is_dir():
            raise OutputExists(f"{arg} {target}: a file, not a folder; name another path for the {what}")
        try:
            if not any(target.iterdir()):
                return target  # an empty folder: written into (replaced by the new one)
        except OSError as e:
            raise UsageError(f"{arg} {target}: cannot read it ({_reason(e)})") from e
    if not ours(target):
        marker = getattr(ours, "marker", None)
        why = f"no {marker} in it" if marker else "voltacache did not write it"
        article = "an" if what[0] in "aeiou" else "a"
        raise OutputExists(
            f"{arg} {target}: not {article} {what} ({why}); voltacache replaces only what it wrote: "
            f"name a new or empty {kind}"
        )
    if not force:
        raise OutputExists(
            f"{arg} {target}: holds an earlier {what}; pass --force to replace it "
            "(it stays until the new one is complete), or name another path"
        )
    return target


def refuse_overlap(target: str | Path, source: str | Path, arg: str, source_arg: str, inside: bool = False) -> None:
    """Refuse an output that is its input or holds it (replacing it would destroy the input);
    with `inside`, an output inside the input as well."""
    out, src = Path(os.path.realpath(target)), Path(os.path.realpath(source))
    if out == src:
        raise UsageError(f"{arg} {target}: the same path as {source_arg} {source}; name another path")
    if out in src.parents:
        raise UsageError(f"{arg} {target}: contains {source_arg} {source}; name a folder outside it")
    if inside and src in out.parents:
        raise UsageError(f"{arg} {target}: inside {source_arg} {source}; name a folder outside it")


def _sibling(target: Path, tag: str) -> Path:
    base = target.with_name(f".{target.name}.{tag}-{os.getpid()}")
    path, n = base, 1
    while os.path.lexists(path):
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def _make_parents(folder: Path, arg: str, target: Path) -> list[Path]:
    """Create the missing ancestors of the output; returns them, outermost first."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
    except OSError as e:
        _remove_empty(created)
        raise UsageError(f"{arg} {target}: cannot create {path} ({_reason(e)}); name a writable path") from e
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def staged_output(
    target: str | Path, *, force: bool = False, ours: Ours, arg: str = "--out", what: str = "output", file: bool = False
) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to write into (a new folder; for `file`, a path to write);
    on success it is renamed into place, on any failure (Ctrl-C too) removed, `target` untouched."""
    checks = dict(force=force, ours=ours, arg=arg, what=what, file=file)
    target = check_target(target, **checks)
    created = _make_parents(target.parent, arg, target)
    staging = _sibling(target, "tmp")
    try:
        staging.touch(exist_ok=False) if file else staging.mkdir()
    except OSError as e:
        _remove_empty(created)
        raise UsageError(f"{arg} {target}: cannot write there ({_reason(e)}); name a writable path") from e
    try:
        yield staging
        _commit(staging, target, checks)
    except BaseException:
        _discard(staging)
        _remove_empty(created)
        raise


def _commit(staging: Path, target: Path, checks: dict) -> None:
    check_target(target, **checks)  # again: something may have appeared there meanwhile
    if checks["file"] or not target.exists() or not any(target.iterdir()):
        os.replace(staging, target)  # atomic, also over an old file or an empty folder
        return
    aside = _sibling(target, "old")
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
