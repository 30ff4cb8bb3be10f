"""``make dist``: an offline install artifact for Debian 12 VMs.

``dist/onnx-appliance-<version>.tar.gz`` (plus ``.sha256``) holds the app wheel, every locked
runtime dependency as a wheel for CPython 3.11 on x86_64 Linux, the hash-pinned requirements,
``install.sh`` and a manifest with the SHA-256 of every file. ``install.sh`` creates the venv
with the VM's own Python, from those files only (``--no-index``): no package index needed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = [
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_34_x86_64",
    "linux_x86_64",
]
PYTHON = "3.11"
# Locked dependencies published without a Linux wheel: built here from their hash-checked
# source into a wheel for this machine's kind (Debian 12, x86_64, CPython 3.11, as the VMs).
BUILT_HERE = ("gunicorn-h1c",)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def uv() -> str:
    found = shutil.which("uv") or str(ROOT / ".venv" / "bin" / "uv")
    if not Path(found).exists():
        raise SystemExit("dist: uv is needed (make installs it)")
    return found


def _split(requirements: str, names: tuple[str, ...]) -> tuple[str, list[str]]:
    """The exported requirements without the blocks of ``names``, and those blocks."""
    kept: list[str] = []
    taken: list[str] = []
    current = kept
    for line in requirements.splitlines(keepends=True):
        if line and not line[0].isspace() and not line.startswith("#"):
            current = taken if line.split("==")[0].strip() in names else kept
            if current is taken:
                taken.append("")
        if current is taken:
            taken[-1] += line
        else:
            kept.append(line)
    return "".join(kept), taken


def _build_wheel(block: str, wheels: Path, stage: Path) -> str:
    """Build one pinned requirement (its source archive checked against the locked hashes)
    into ``wheels``; its requirement line pinned to the wheel's own hash."""
    source = stage / "source-requirement.txt"
    source.write_text(block)
    before = set(wheels.iterdir())
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary", ":all:",
         "--require-hashes", "-r", str(source), "-w", str(wheels)],
        check=True,
        capture_output=True,
        timeout=1200,
    )  # fmt: skip
    source.unlink()
    (wheel,) = set(wheels.iterdir()) - before
    pin = block.split(maxsplit=1)[0]
    return f"{pin} --hash=sha256:{sha256(wheel)}\n"


def build(out: Path) -> Path:
    """Build the artifact into ``out`` and return the tarball's path."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    name = f"onnx-appliance-{version}"
    stage = out / name
    if stage.exists():
        shutil.rmtree(stage)
    wheels = stage / "wheels"
    wheels.mkdir(parents=True)
    subprocess.run(
        [uv(), "build", "--wheel", "--out-dir", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    requirements = stage / "requirements.txt"
    exported = subprocess.run(
        [
            uv(),
            "export",
            "--frozen",
            # The runtime alone: no dev tools, and not the packages make run builds text
            # models from (the artifact serves the repository the models role deploys).
            "--no-default-groups",
            "--no-emit-project",
            "--format",
            "requirements-txt",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    downloaded, built = _split(exported.stdout, BUILT_HERE)
    requirements.write_text(downloaded)
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    if (
        subprocess.run(
            [sys.executable, "-m", "pip", "--version"], capture_output=True, check=False
        ).returncode
        != 0
    ):
        # uv-made environments come without pip; pip is what downloads for another platform.
        subprocess.run(
            [uv(), "pip", "install", "--quiet", "--python", sys.executable, "pip"],
            check=True,
            capture_output=True,
            timeout=300,
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--python-version",
            PYTHON,
            "--implementation",
            "cp",
            *platform_args,
            "--require-hashes",
            "-r",
            str(requirements),
            "-d",
            str(wheels),
        ],
        check=True,
        capture_output=True,
        timeout=1200,
    )
    with requirements.open("a") as pins:
        for block in built:
            pins.write(_build_wheel(block, wheels, stage))
    shutil.copy(ROOT / "packaging" / "install.sh", stage / "install.sh")
    (stage / "install.sh").chmod(0o755)
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    manifest = {
        "name": "onnx-appliance",
        "version": version,
        "python": PYTHON,
        "files": {str(p.relative_to(stage)): sha256(p) for p in files},
    }
    (stage / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tarball = out / f"{name}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(stage, arcname=name)
    (out / f"{name}.tar.gz.sha256").write_text(f"{sha256(tarball)}  {tarball.name}\n")
    print(f"built {tarball} ({tarball.stat().st_size // 1024} KiB, {len(files)} files)")
    return tarball


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "dist")
