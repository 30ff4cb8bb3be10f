"""Generate ``app/protocols/grpc/inference_pb2*.py`` from ``inference.proto``.

    .venv/bin/python packaging/generate_grpc.py [ROOT]

Runs ``grpc_tools.protoc`` (grpcio-tools 1.81, for protobuf 6), then puts the messages in a
descriptor pool of their own: Triton's client registers the same message names
(``inference.ModelInferRequest``...) in protobuf's default pool, and two files defining one
name in one pool cannot both be imported. The wire does not see pools: message and field
numbers, and the service path ``/inference.GRPCInferenceService/<call>``, stay the protocol's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = "app/protocols/grpc/inference.proto"
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = (
    "# Its own pool, not protobuf's default one, where tritonclient has the same names\n"
    "# (packaging/generate_grpc.py).\n"
    "_POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = _POOL.AddSerializedFile("
)


def generate(root: Path) -> None:
    """Write the modules beside ``root / PROTO``."""
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", PROTO],
        cwd=root, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    module = root / PROTO.replace(".proto", "_pb2.py")
    text = module.read_text()
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit(f"generate_grpc: {module} does not register its file as expected")
    module.write_text(text.replace(DEFAULT_POOL, OWN_POOL))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
