"""What voltacache owns, and how it writes it so that nothing a user owns is ever lost.

Every folder a command writes (an export, an engines folder, a model repository, a pipeline, search
results) is an *output* of one kind: a marker file at its root says which kind, and lists every file
voltacache wrote there (`owned`, written when the output is committed; artifacts other commands add
later, such as a DeepCache calibration, are added to the list by `record_owned`). The rules:

- An output is written into a temporary sibling (`.<name>.tmp-<pid>`) and renamed into place only
  once everything succeeded: a failure or Ctrl-C removes the sibling and leaves the earlier output whole.
- Replacing an earlier output needs `force`, and replaces only the files its marker lists. Anything
  else found inside (a user's file, a folder, an output nested in it) is refused in one line naming it,
  `force` or not; the user moves it out. After the swap only the listed files are deleted.
- Owned artifacts that the new output does not invalidate are carried into it (`carry`).
- An output is never created inside another output, nor over a folder voltacache did not write.

Single files (an image, a calibration, a single-file checkpoint) follow the same staging with `staged_file`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputExists, UsageError

OWNED = "owned"  # the marker's list of the files voltacache wrote in the output, relative, '/'-separated


@dataclass(frozen=True)
class OutputKind:
    """A kind of folder voltacache writes: its marker (a JSON object holding `keys`) and, for outputs
    written before markers listed their files, the patterns of what those versions wrote there."""

    what: str
    marker: str
    keys: tuple[str, ...]
    legacy: tuple[str, ...] = ()

    @property
    def article(self) -> str:
        return "an" if self.what[0] in "aeiou" else "a"

    def read_marker(self, folder: Path) -> dict | None:
        try:
            data = json.loads((Path(folder) / self.marker).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and all(key in data for key in self.keys) else None

    def __call__(self, folder: Path) -> bool:
        """Whether voltacache wrote `folder` as an output of this kind."""
        return Path(folder).is_dir() and self.read_marker(folder) is not None

    def owned(self, folder: Path) -> set[str] | None:
        """The files voltacache wrote in `folder` (relative, '/'-separated), or None when it is not ours."""
        folder = Path(folder)
        data = self.read_marker(folder) if folder.is_dir() else None
        if data is None:
            return None
        if isinstance(data.get(OWNED), list):
            return with_bytecode(folder, {str(p) for p in data[OWNED]} | {self.marker})
        patterns = (self.marker, *self.legacy)
        return {rel for rel in files_in(folder) if any(matches(rel, p) for p in patterns)}


def with_bytecode(folder: Path, owned: set[str]) -> set[str]:
    """`owned` and the bytecode Python compiled from its .py files (`__pycache__/NAME.*.pyc` beside NAME.py):
    a served repository gains them when Triton's Python backend imports its models."""
    derived = set()
    for cache in Path(folder).rglob("__pycache__"):
        base = cache.parent.relative_to(folder)
        for pyc in cache.glob("*.pyc"):
            if (base / (pyc.name.split(".")[0] + ".py")).as_posix() in owned:
                derived.add((base / "__pycache__" / pyc.name).as_posix())
    return owned | derived


EXPORT = OutputKind(
    "export",
    "manifest.json",
    ("format", "fingerprint", "components"),
    ("*.onnx", "*.onnx.data", "tokenizer/**", "tokenizer_2/**"),
)
ENGINES = OutputKind(
    "engines folder",
    "engines.json",
    ("backend", "files", "export"),
    ("*.onnx", "*.onnx.data", "*.plan", "tokenizer/**", "tokenizer_2/**", "deepcache_schedules.json"),
)
REPOSITORY = OutputKind(
    "model repository", "voltacache.json", ("engines", "component_backend"), ("*/config.pbtxt", "*/1/**", "*/loras/**")
)
PIPELINE = OutputKind(
    "pipeline folder",
    "voltacache_preset.json",
    ("preset",),
    ("model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt"),
)
CONTROLNET = OutputKind(
    "ControlNet folder", "voltacache_controlnet.json", ("preset",), ("config.json", "*.safetensors")
)
SEARCH_RESULTS = OutputKind("search results folder", "search.json", ("query", "results"), ("*.png",))
OUTPUT_KINDS = (EXPORT, ENGINES, REPOSITORY, PIPELINE, CONTROLNET, SEARCH_RESULTS)


def kind_of(folder: Path, kinds: tuple[OutputKind, ...] = OUTPUT_KINDS) -> OutputKind | None:
    """Which kind of output `folder` is, if voltacache wrote it."""
    return next((kind for kind in kinds if kind(folder)), None)


def files_in(folder: Path) -> list[str]:
    """Every file (and symbolic link) under `folder`, relative and '/'-separated, and every empty
    folder, with a trailing '/'."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        links = [d for d in dirs if (Path(root) / d).is_symlink()]  # os.walk lists them as folders
        found += [(base / name).as_posix() for name in (*files, *links)]
        if not dirs and not files and root != str(folder):
            found.append(base.as_posix() + "/")
    return sorted(found)


def foreign(folder: Path, owned: set[str]) -> list[str]:
    """What is in `folder` that voltacache did not write: files not in `owned`, and folders holding none
    of them (named once, with a trailing '/')."""
    parents = {p.as_posix() for rel in owned for p in Path(rel).parents}
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        walk = []
        for name in sorted(dirs):
            rel = (base / name).as_posix()
            if (Path(root) / name).is_symlink():  # a link is a file here: owned or not, never followed
                found += [] if rel in owned else [rel]
            elif rel in parents or rel + "/" in owned:
                walk.append(name)
            else:
                found.append(rel + "/")
        dirs[:] = walk
        found += [(base / name).as_posix() for name in sorted(files) if (base / name).as_posix() not in owned]
    return found


def matches(rel: str, pattern: str) -> bool:
    """`pattern` against a relative path: `*` within one path segment, a trailing `/**` for anything below."""
    if pattern.endswith("/**"):
        head = pattern[:-3]
        parts = rel.split("/")
        return any(fnmatch.fnmatchcase("/".join(parts[:n]), head) for n in range(1, len(parts)))
    return rel.count("/") == pattern.count("/") and fnmatch.fnmatchcase(rel, pattern)


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def refuse_nested(target: Path, arg: str, kinds: tuple[OutputKind, ...] = OUTPUT_KINDS) -> None:
    """An output inside another output would be lost or carried off with it: refuse it at creation."""
    for parent in Path(os.path.abspath(target)).parents:
        kind = kind_of(parent, kinds)
        if kind is not None:
            raise UsageError(
                f"{arg} {target}: inside the {kind.what} {parent} (its {kind.marker}); an output inside "
                "another would be replaced or moved with it: name a folder outside it"
            )


def check_folder(target: str | Path, kind: OutputKind, *, force: bool, arg: str = "--out") -> Path:
    """Refuse a folder that may not be written; returns it as an absolute path.

    Fine: nothing there, an empty folder, or an earlier output of `kind` holding nothing but what
    voltacache wrote, with `force`. Checked again when the new output is committed."""
    target = Path(os.path.abspath(target))
    if not target.name:
        raise UsageError(f"{arg} {target}: name a folder to write the {kind.what} into")
    if target.is_symlink():
        raise OutputExists(f"{arg} {target}: a symbolic link; name the folder it points to, or another path")
    kinds = (kind, *OUTPUT_KINDS)
    refuse_nested(target, arg, kinds)
    if not target.exists():
        return target
    if not target.is_dir():
        raise OutputExists(f"{arg} {target}: a file, not a folder; name another path for the {kind.what}")
    try:
        empty = not any(target.iterdir())
    except OSError as e:
        raise UsageError(f"{arg} {target}: cannot read it ({_reason(e)})") from e
    if empty:
        return target  # written into (replaced by the new one)
    owned = kind.owned(target)
    if owned is None:
        other = kind_of(target, kinds)
        if other:
            why = f"it is {other.article} {other.what}"
        elif (target / kind.marker).exists():  # torn or edited: what voltacache wrote there cannot be known
            why = f"its {kind.marker} cannot be read, so what voltacache wrote there is unknown"
        else:
            why = f"no {kind.marker} in it"
        raise OutputExists(
            f"{arg} {target}: not {kind.article} {kind.what} ({why}); voltacache replaces only what it wrote: "
            "name a new or empty folder"
        )
    extra = foreign(target, owned)
    if extra:
        nested = kind_of(target / extra[0], kinds) if extra[0].endswith("/") else None
        what = f" ({nested.article} {nested.what} of its own)" if nested else ""
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise OutputExists(
            f"{arg} {target}: holds {extra[0]}{what}{more}, which voltacache did not write there; it replaces "
            f"only what it wrote: move that out of {target.name}, or name another folder"
        )
    if not force:
        raise OutputExists(
            f"{arg} {target}: holds an earlier {kind.what}; pass --force to replace it "
            "(it stays until the new one is complete), or name another path"
        )
    return target


def check_file(
    target: str | Path,
    *,
    force: bool,
    ours: Callable[[Path], bool],
    arg: str = "--out",
    what: str = "output",
    elsewhere: str = ", or name another path",
) -> Path:
    """Refuse a file that may not be written: a folder, a link, or an existing file voltacache did
    not write (`ours`) or, without `force`, one it did. Returns it as an absolute path."""
    target = Path(os.path.abspath(target))
    if not target.name:
        raise UsageError(f"{arg} {target}: name a file to write the {what} into")
    if target.is_symlink():
        raise OutputExists(f"{arg} {target}: a symbolic link; name the file it points to, or another path")
    if not target.exists():
        return target
    if target.is_dir():
        raise OutputExists(f"{arg} {target}: a folder, not a file; name a file for the {what}")
    if not ours(target):
        article = "an" if what[0] in "aeiou" else "a"
        raise OutputExists(
            f"{arg} {target}: not {article} {what} (voltacache did not write it); voltacache replaces only what "
            "it wrote: name a new file"
        )
    if not force:
        raise OutputExists(
            f"{arg} {target}: holds an earlier {what}; pass --force to replace it "
            f"(it stays until the new one is complete){elsewhere}"
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
    """Remove a staging sibling: voltacache made it and wrote everything in it."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sweep_stale(target: Path, tag: str = "tmp") -> None:
    """Remove the staging siblings of `target` that a killed earlier run left (SIGKILL gives no chance to
    clean up): named as _sibling names them, by a process that is gone. Ours by name and by pid."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{tag}-(\d+)(-\d+)?")
    with contextlib.suppress(OSError):
        for path in target.parent.iterdir():
            found = pattern.fullmatch(path.name)
            if found and not _alive(int(found.group(1))):
                _discard(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stage(target: Path, arg: str, make: Callable[[Path], None]) -> tuple[Path, list[Path]]:
    created = _make_parents(target.parent, arg, target)
    _sweep_stale(target)
    staging = _sibling(target, "tmp")
    try:
        make(staging)
    except OSError as e:
        _remove_empty(created)
        raise UsageError(f"{arg} {target}: cannot write there ({_reason(e)}); name a writable path") from e
    return staging, created


Carry = Callable[[Path, set, Path], None]  # (earlier output, its owned files, the new output's staging folder)


@contextlib.contextmanager
def staged_output(
    target: str | Path, kind: OutputKind, *, force: bool = False, arg: str = "--out", carry: Carry | None = None
) -> Iterator[Path]:
    """Yield a new temporary sibling of `target` to write the output into; on success the files are
    listed in its marker, `carry` copies what the earlier output keeps over, and it is renamed into
    place (the earlier output's own files deleted); on any failure (Ctrl-C too) it is removed and
    `target` is untouched. The body must write `kind.marker`."""
    target = check_folder(target, kind, force=force, arg=arg)
    staging, created = _stage(target, arg, Path.mkdir)
    try:
        yield staging
        _commit(staging, target, kind, force, arg, carry)
    except BaseException:
        _discard(staging)
        _remove_empty(created)
        raise


def _commit(staging: Path, target: Path, kind: OutputKind, force: bool, arg: str, carry: Carry | None) -> None:
    check_folder(target, kind, force=force, arg=arg)  # again: something may have appeared there meanwhile
    earlier = kind.owned(target) if target.exists() else None
    if earlier is not None and carry is not None:
        carry(target, earlier, staging)
    _write_owned(staging, kind, set(files_in(staging)))
    if earlier is None:
        os.replace(staging, target)  # atomic, also over an empty folder
        return
    aside = _sibling(target, "old")
    with uninterrupted():  # the swap and the old files' removal end as one: a Ctrl-C now changes nothing
        os.replace(target, aside)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(aside, target)
            raise
        remove_owned(aside, earlier)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C is ignored while an output is being put in place (in the main thread, where Python takes it):
    moments of renames and deletions that must not stop half-way; the command then ends as it would have."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def remove_owned(folder: Path, owned: set[str]) -> None:
    """Delete the files voltacache wrote in `folder`, then the folders they leave empty; anything else
    (it appeared after the last check) stays, and the user is told where."""
    for rel in owned:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            (folder / rel).unlink()
    for root, _, _ in sorted(os.walk(folder), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            os.rmdir(root)
    if folder.exists():
        warnings.warn(
            f"{folder}: kept, it holds files voltacache did not write (move them where they belong)", stacklevel=2
        )


def _write_owned(folder: Path, kind: OutputKind, owned: set[str]) -> None:
    path = folder / kind.marker
    data = json.loads(path.read_text())
    data[OWNED] = sorted(owned - {kind.marker})
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(json.dumps(data, indent=2, default=str))
    os.replace(staging, path)


def record_owned(folder: Path, kind: OutputKind, *added: str) -> None:
    """Add files another command wrote into an output (a calibration into engines) to what it owns."""
    owned = kind.owned(folder)
    if owned is None:
        raise UsageError(f"{folder}: not {kind.article} {kind.what}")
    _write_owned(Path(folder), kind, owned | set(added))


@contextlib.contextmanager
def staged_file(target: str | Path, *, force: bool = False, **checks) -> Iterator[Path]:
    """Yield a temporary sibling path of `target` to write the file; renamed over `target` on success,
    removed on any failure. `checks`: check_file's."""
    checks = dict(force=force, **checks)
    arg = checks.get("arg", "--out")
    target = check_file(target, **checks)
    staging, created = _stage(target, arg, lambda path: path.touch(exist_ok=False))
    try:
        yield staging
        check_file(target, **checks)
        os.replace(staging, target)
    except BaseException:
        _discard(staging)
        _remove_empty(created)
        raise


def check_writable(path: Path, arg: str) -> None:
    """A file can be written at `path`: its nearest existing ancestor is a folder where a file can be
    made (tried, then removed), and nothing on the way is a file."""
    import tempfile

    folder = Path(os.path.abspath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{arg} {path}: {folder} is a file, not a folder; name a path in a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".voltacache-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"{arg} {path}: cannot write in {folder} ({e.strerror or e}); name a writable path") from None
