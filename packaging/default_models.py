"""The model repository ``make run`` serves: the bundled demo models plus the text models,
built from their packages' weights into a cache.

    .venv/bin/python packaging/default_models.py build/models

Copies ``app/demo_models`` and builds ``minilm`` (packaging/text/build_minilm.py) and
``smollm2`` (packaging/text/build_smollm.py) when the folder lacks one or its builder changed
since; a second run with nothing changed does nothing.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "text"))

import build_minilm  # noqa: E402 (found through the path above)
import build_smollm  # noqa: E402

STAMP = ".built-by"


#: The text models and the script that builds each.
BUILDERS: tuple[Any, ...] = (build_minilm, build_smollm)


def _fingerprint(builder: Any) -> str:
    """What a built model depends on: its builder and the helpers it shares."""
    digest = hashlib.sha256()
    for name in (Path(builder.__file__).name, "graph.py"):
        digest.update((HERE / "text" / name).read_bytes())
    return digest.hexdigest()


def build(out: Path) -> None:
    """Make ``out`` the default repository (demo models and text models)."""
    out.mkdir(parents=True, exist_ok=True)
    for model in sorted((ROOT / "app" / "demo_models").iterdir()):
        if model.is_dir():
            shutil.copytree(model, out / model.name, dirs_exist_ok=True)
    for builder in BUILDERS:
        stamp = out / builder.NAME / STAMP
        if not stamp.is_file() or stamp.read_text() != _fingerprint(builder):
            target = builder.build(out)
            stamp.write_text(_fingerprint(builder))
            size = sum(f.stat().st_size for f in target.parent.iterdir())
            print(f"built {target.parent} ({size / 1e6:.1f} MB)")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: default_models.py OUT", file=sys.stderr)
        return 2
    build(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
