import json

import pytest
from typer.testing import CliRunner

from voltacache.cli import app

runner = CliRunner()


def generate(engines_dir, tmp_path, prompt, *extra):
    out = tmp_path / f"img-{len(list(tmp_path.glob('img-*')))}.png"  # a new file each time: none is replaced
    args = [
        "generate",
        "--engines",
        str(engines_dir),
        prompt,
        "-o",
        str(out),
        "--steps",
        "4",
        "--scheduler",
        "ddim",
        "--seed",
        "5",
        "--cache-index",
        str(tmp_path / "cache.db"),
        "--json",
        *extra,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_generate_reports_the_cache_layer(engines_dir, tmp_path):
    first = generate(engines_dir, tmp_path, "a quiet harbour")
    second = generate(engines_dir, tmp_path, "a quiet harbour")
    off = generate(engines_dir, tmp_path, "a quiet harbour", "--cache", "off")
    assert (first["cache"], second["cache"], off["cache"]) == ("miss", "semantic", "off")
    assert (first["steps_computed"], second["steps_computed"], off["steps_computed"]) == (4, 0, 4)
    assert second["similarity"] > 0.99


@pytest.mark.slow
def test_cache_stats_purge_clear(engines_dir, tmp_path):
    """The tiny model's cache is 64-wide: the commands read that from the index (no --dim)."""
    generate(engines_dir, tmp_path, "a quiet harbour")
    index = ["--cache-index", str(tmp_path / "cache.db")]
    stats = json.loads(runner.invoke(app, ["cache", "stats", *index]).stdout)
    assert stats["collection"] == "voltacache_clip_64"
    assert stats["entries"] >= 1 and stats["by_kind"]["image"] == 1 and stats["bytes"] > 0
    purged = json.loads(runner.invoke(app, ["cache", "purge-expired", *index]).stdout)
    assert purged == {"purged": 0}
    cleared = runner.invoke(app, ["cache", "clear", *index])
    assert cleared.exit_code == 0 and json.loads(cleared.stdout)["removed"] == stats["entries"]
    assert f"removed {stats['entries']} entries" in cleared.stderr
    assert json.loads(runner.invoke(app, ["cache", "stats", *index]).stdout)["entries"] == 0


def test_cache_warm_then_stats(engines_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a quiet harbour\na red kite\n")
    index = ["--cache-index", str(tmp_path / "cache.db")]
    args = ["--prompts", str(prompts), "--engines", str(engines_dir), *index, "--steps", "2", "--scheduler", "ddim"]
    warmed = runner.invoke(app, ["cache", "warm", *args, "--out", str(tmp_path / "warm" / "img.png")])
    assert warmed.exit_code == 0, warmed.output
    stats = json.loads(runner.invoke(app, ["cache", "stats", *index]).stdout)
    assert stats["collection"] == "voltacache_clip_64" and stats["by_kind"]["image"] == 2


def test_cache_search_and_list_in_process(engines_dir, tmp_path):
    """`cache search` finds this model's images nearest a prompt and writes them, never over a folder
    it did not write; `cache list` shows what the index holds, newest first."""
    import numpy as np
    from helpers import cli, one_error_line
    from PIL import Image

    generate(engines_dir, tmp_path, "a quiet harbour")
    generate(engines_dir, tmp_path, "a red kite over a hill")
    index = ["--cache-index", tmp_path / "cache.db"]
    out = tmp_path / "found"
    found = cli("cache", "search", "a quiet harbour", *index, "--engines", engines_dir, "--out", out)
    assert found.exit_code == 0, found.output
    lines = found.stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith("a quiet harbour") and " 1.000 " in lines[0]
    document = json.loads((out / "search.json").read_text())
    first = document["results"][0]
    assert document["query"]["text"] == "a quiet harbour" and first["seed"] == 5
    stored = np.asarray(Image.open(tmp_path / "img-0.png"))
    assert (np.asarray(Image.open(out / first["file"])) == stored).all()

    again = cli("cache", "search", "a quiet harbour", *index, "--engines", engines_dir, "--out", out)
    one_error_line(again, 2, "--out", "--force")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    theirs = cli("cache", "search", "a kite", *index, "--engines", engines_dir, "--out", mine, "--force")
    assert theirs.exit_code != 0 and (mine / "notes.txt").read_text() == "keep"
    replaced = cli("cache", "search", "a kite", *index, "--engines", engines_dir, "--out", out, "--force")
    assert replaced.exit_code == 0 and json.loads((out / "search.json").read_text())["query"]["text"] == "a kite"

    listed = cli("cache", "list", *index)
    assert listed.exit_code == 0 and [line.rsplit("  ", 1)[-1] for line in listed.stdout.splitlines()] == [
        "a red kite over a hill",
        "a quiet harbour",
    ]
    # the tiny model's random CLIP places prompts anyhow: its own prompt is the one sure neighbour
    recommended = cli("cache", "search", "a red kite over a hill", "--prompts", *index, "--engines", engines_dir)
    assert recommended.stdout.splitlines()[0].endswith("a red kite over a hill")


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["search", "x", "--cache-index", "{index}"], 2, "--engines"),
        (["search", "x"], 2, "--url"),
        (["search", "x", "--url", "127.0.0.1:1", "--cache-index", "{index}"], 2, "exactly one"),
        (["search", " ", "--cache-index", "{index}", "--engines", "{engines}"], 2, "query is empty"),
        (["search", "x", "--top", "0", "--cache-index", "{index}", "--engines", "{engines}"], 2, "top"),
        (["list", "--order", "oldest", "--cache-index", "{index}"], 2, "--order"),
        (["search", "x", "--cache-index", "{missing}", "--engines", "{engines}"], 2, "no such cache index"),
        (["list", "--url", "127.0.0.1:1"], 1, "no voltacache server answers"),
    ],
)
def test_cache_search_refuses_with_one_line(engines_dir, tmp_path, args, code, words):
    from helpers import cli, one_error_line

    (tmp_path / "cache.db").mkdir()
    (tmp_path / "cache.db" / "collections").mkdir()
    values = dict(index=tmp_path / "cache.db", engines=engines_dir, missing=tmp_path / "nope.db")
    one_error_line(cli("cache", *[a.format(**values) for a in args]), code, words)
