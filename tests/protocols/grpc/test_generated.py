"""The committed modules are what packaging/generate_grpc.py makes of the committed .proto,
the service is the Open Inference Protocol's (package, names and field numbers are the wire),
and its messages live beside tritonclient's in one process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from app.protocols.grpc import inference_pb2 as pb
from tests.conftest import ROOT

GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    source = tmp_path / "app" / "protocols" / "grpc"
    source.mkdir(parents=True)
    shutil.copy(ROOT / "app" / "protocols" / "grpc" / "inference.proto", source)
    subprocess.run(
        [sys.executable, str(ROOT / "packaging" / "generate_grpc.py"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for name in GENERATED:
        again = (source / name).read_text()
        assert again == (ROOT / "app" / "protocols" / "grpc" / name).read_text(), name


def test_the_wire_contract() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} >= {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "ModelStreamInfer", "RepositoryIndex",
    }  # fmt: skip
    request = pb.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in request.items()} == {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5,
        "outputs": 6, "raw_input_contents": 7,
    }  # fmt: skip
    contents = pb.InferTensorContents.DESCRIPTOR.fields_by_name
    assert [contents[n].number for n in ("bool_contents", "fp32_contents", "bytes_contents")] == [
        1, 6, 8,
    ]  # fmt: skip
    response = pb.ModelInferResponse.DESCRIPTOR.fields_by_name
    assert response["raw_output_contents"].number == 6


def test_tritonclients_messages_and_ours_share_a_process_and_the_wire() -> None:
    from tritonclient.grpc import service_pb2  # registers the same names in protobuf's pool

    ours = pb.ModelInferRequest(model_name="tabular", raw_input_contents=[b"\x00" * 4])
    ours.inputs.add(name="input", datatype="FP32", shape=[1])
    theirs = service_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert (theirs.model_name, theirs.inputs[0].datatype) == ("tabular", "FP32")
    assert pb.ModelInferRequest.FromString(theirs.SerializeToString()) == ours
