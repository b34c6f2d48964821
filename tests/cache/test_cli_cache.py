import json

from typer.testing import CliRunner

from voltacache.cli import app

runner = CliRunner()


def generate(engines_dir, tmp_path, prompt, *extra):
    out = tmp_path / "img.png"
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


def test_generate_reports_the_cache_layer(engines_dir, tmp_path):
    first = generate(engines_dir, tmp_path, "a quiet harbour")
    second = generate(engines_dir, tmp_path, "a quiet harbour")
    off = generate(engines_dir, tmp_path, "a quiet harbour", "--cache", "off")
    assert (first["cache"], second["cache"], off["cache"]) == ("miss", "semantic", "off")
    assert (first["steps_computed"], second["steps_computed"], off["steps_computed"]) == (4, 0, 4)
    assert second["similarity"] > 0.99


def test_cache_stats_purge_clear(engines_dir, tmp_path):
    generate(engines_dir, tmp_path, "a quiet harbour")
    index = ["--cache-index", str(tmp_path / "cache.db"), "--dim", "64"]
    stats = json.loads(runner.invoke(app, ["cache", "stats", *index]).stdout)
    assert stats["entries"] >= 1 and stats["by_kind"]["image"] == 1 and stats["bytes"] > 0
    purged = json.loads(runner.invoke(app, ["cache", "purge-expired", *index]).stdout)
    assert purged == {"purged": 0}
    assert runner.invoke(app, ["cache", "clear", *index]).exit_code == 0
    assert json.loads(runner.invoke(app, ["cache", "stats", *index]).stdout)["entries"] == 0
