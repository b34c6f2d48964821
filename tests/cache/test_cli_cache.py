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
