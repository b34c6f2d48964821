"""Small helpers the tests share: the CLI as a user runs it, and what a folder holds."""

from __future__ import annotations

import hashlib

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
