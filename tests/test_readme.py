"""The README's layout table matches the tree: every path it names exists, and every module of
the package is named in it."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def _layout() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Layout (dependencies point down):")
    return readme[start : readme.index("\n\n", readme.index("| path | holds |", start))]


def test_every_path_in_the_layout_exists() -> None:
    for row in _layout().splitlines()[2:]:
        first = row.split("|")[1]
        for path in re.findall(r"`([^`]+)`", first):
            target = path if "/" in path else f"app/{path}"
            assert (ROOT / target).exists(), path


def test_every_module_is_in_the_layout() -> None:
    layout = _layout()
    rows = {row.split("|")[1]: row for row in layout.splitlines()[2:]}
    for module in sorted((ROOT / "app").rglob("*.py")):
        relative = module.relative_to(ROOT)
        if module.name == "__init__.py" and module.parent != ROOT / "app":
            continue
        package = f"app/{relative.parts[1]}/" if len(relative.parts) > 2 else None
        if package is None:
            assert f"`{relative}`" in layout or f"`{module.name}`" in layout, relative
            continue
        row = next((r for first, r in rows.items() if f"`{package}`" in first), "")
        assert row, f"{package} has no row"
        assert module.stem in row, relative
