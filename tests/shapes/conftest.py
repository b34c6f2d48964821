import pytest
from typer.testing import CliRunner

from voltacache.cli import app


@pytest.fixture(scope="session")
def shapes_model(tmp_path_factory):
    """The shipped shapes weights, as `init-tiny --preset shapes` writes them."""
    out = tmp_path_factory.mktemp("shapes") / "model"
    result = CliRunner().invoke(app, ["init-tiny", str(out), "--preset", "shapes"])
    assert result.exit_code == 0, result.output
    return out
