"""The package's version string is the one the wheel is built with."""

import tomllib
from pathlib import Path

from app import __version__


def test_version_matches_pyproject() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert __version__ == pyproject["project"]["version"]
