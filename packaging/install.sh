#!/bin/sh
# Install this onnx-appliance artifact without any package index: ./install.sh [PREFIX]
#
# Creates PREFIX/releases/<version>/venv with the machine's own python3 from the wheels in
# this folder only, then points PREFIX/current at it. Installing a version that is already
# there changes nothing; a new version leaves the previous ones in place for rollback
# (`ln -sfn releases/<old> PREFIX/current`).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
prefix=${1:-/opt/onnx-appliance}
python=${PYTHON:-python3}

# Every file must match the manifest before anything is installed.
"$python" - "$here" <<'PY'
import hashlib, json, pathlib, sys
root = pathlib.Path(sys.argv[1])
manifest = json.loads((root / "MANIFEST.json").read_text())
for name, digest in manifest["files"].items():
    if hashlib.sha256((root / name).read_bytes()).hexdigest() != digest:
        sys.exit(f"install.sh: {name} does not match MANIFEST.json; refusing to install")
PY
version=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' \
    "$here/MANIFEST.json")
target="$prefix/releases/$version"

if [ -f "$target/.installed" ] && cmp -s "$here/MANIFEST.json" "$target/MANIFEST.json"; then
    echo "onnx-appliance $version is already installed in $target"
else
    rm -rf "$target"  # a half-finished earlier attempt
    mkdir -p "$target"
    "$python" -m venv "$target/venv"
    "$target/venv/bin/pip" install --quiet --disable-pip-version-check --no-index \
        --find-links "$here/wheels" --require-hashes -r "$here/requirements.txt"
    "$target/venv/bin/pip" install --quiet --disable-pip-version-check --no-index --no-deps \
        "$here"/wheels/onnx_appliance-*.whl
    cp "$here/MANIFEST.json" "$target/MANIFEST.json"
    touch "$target/.installed"
    echo "onnx-appliance $version installed in $target"
fi

if [ "$(readlink "$prefix/current" 2>/dev/null || true)" != "releases/$version" ]; then
    ln -sfn "releases/$version" "$prefix/current.new"
    mv -T "$prefix/current.new" "$prefix/current"
    echo "$prefix/current -> releases/$version"
fi
