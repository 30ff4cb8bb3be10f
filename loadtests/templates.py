"""Render the project's one copy of each config template, as Ansible does (Jinja2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2


def render(template: Path, **variables: Any) -> str:
    """Render ``template``; a variable it uses but is not given is an error."""
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 (config files, not HTML)
    )
    return env.from_string(template.read_text()).render(**variables)
