"""OIP gRPC messages to arrays and back: typed and raw contents of every datatype, the same
refusals as REST, and answers in the form the request used."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from app.models.errors import InvalidInput, PayloadTooLarge
from app.models.onnx import ModelState
from app.models.signature import DATATYPE_TO_NUMPY, Signature, TensorSpec
from app.protocols.grpc import inference_pb2 as pb
from app.protocols.grpc import oip
from app.protocols.v2 import Inference

TYPES = [t for t in DATATYPE_TO_NUMPY if t != "BYTES"]
SIGNATURE = Signature(
    "all", "1",
    tuple(TensorSpec(f"x_{t.lower()}", t, (-1, 2)) for t in DATATYPE_TO_NUMPY),  # type: ignore[arg-type]
    (TensorSpec("y", "FP32", (-1, 2)),),
)  # fmt: skip
IMAGE = Signature("img", "1", (TensorSpec("image", "BYTES", (-1,), raw=True),), ())


def _values(datatype: str) -> np.ndarray:
    if datatype == "BOOL":
        return np.array([[True, False]])
    if datatype == "BYTES":
        return np.array([["héllo", "b"]], dtype=object)
    return np.array([[1, 2]], dtype=DATATYPE_TO_NUMPY[datatype])  # type: ignore[index]


def _request(datatype: str, raw: bool) -> pb.ModelInferRequest:
    name = f"x_{datatype.lower()}"
    values = _values(datatype)
    request = pb.ModelInferRequest(model_name="all", id="r1")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=[1, 2])
    if raw:
        from app.protocols.tensors import array_to_bytes

        request.raw_input_contents.append(array_to_bytes(values, datatype))  # type: ignore[arg-type]
    elif datatype in oip.CONTENTS_FIELD:  # FP16 has no typed field
        field = getattr(tensor.contents, oip.CONTENTS_FIELD[datatype])
        flat = values.reshape(-1)
        field.extend([v.encode() for v in flat] if datatype == "BYTES" else flat.tolist())
    return request


CASES = [(t, raw) for t in [*TYPES, "BYTES"] for raw in (True, False) if t != "FP16" or raw]


@pytest.mark.parametrize(("datatype", "raw"), CASES)
def test_every_datatype_arrives_as_its_array(datatype: str, raw: bool) -> None:
    inference, came_raw = oip.parse_infer(_request(datatype, raw), SIGNATURE, 100)
    (array,) = inference.inputs.values()
    assert came_raw is raw and inference.id == "r1"
    assert array.shape == (1, 2)
    assert array.tolist() == _values(datatype).tolist()
    if datatype != "BYTES":
        assert array.dtype == DATATYPE_TO_NUMPY[datatype]  # type: ignore[index]


def test_fp16_needs_raw_contents() -> None:
    with pytest.raises(InvalidInput, match="FP16: send it in raw_input_contents"):
        oip.parse_infer(_request("FP16", raw=False), SIGNATURE, 100)


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        (lambda r: setattr(r.inputs[0], "datatype", "FP64"), InvalidInput, "has datatype 'FP64'"),
        (lambda r: r.inputs[0].contents.fp32_contents.append(3), InvalidInput, "has 3 elements"),
        (lambda r: r.inputs[0].shape.extend([1]), InvalidInput, "expects [-1, 2]"),
        (lambda r: setattr(r.inputs[0], "name", "nope"), InvalidInput, "nope"),
        (lambda r: r.inputs.add().CopyFrom(r.inputs[0]), InvalidInput, "more than once"),
        (lambda r: r.outputs.add(name="z"), InvalidInput, "z"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 1000), PayloadTooLarge, "limit is 100"),
    ],
)
def test_bad_requests_are_refused_as_rest_refuses_them(change, error, fragment) -> None:  # type: ignore[no-untyped-def]
    request = _request("FP32", raw=False)
    change(request)
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        oip.parse_infer(request, SIGNATURE, 100)


def test_raw_contents_must_match_the_inputs() -> None:
    request = _request("FP32", raw=True)
    request.raw_input_contents.append(b"extra")
    with pytest.raises(InvalidInput, match="2 entries for 1 inputs"):
        oip.parse_infer(request, SIGNATURE, 100)
    request = _request("FP32", raw=True)
    request.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidInput, match="contents as well as raw"):
        oip.parse_infer(request, SIGNATURE, 100)
    request = _request("FP32", raw=True)
    request.raw_input_contents[0] = b"\x00" * 7
    with pytest.raises(InvalidInput, match="7 bytes"):
        oip.parse_infer(request, SIGNATURE, 100)


def test_typed_integers_out_of_range_are_refused() -> None:
    request = _request("INT8", raw=False)
    request.inputs[0].contents.int_contents[0] = 300
    with pytest.raises(InvalidInput, match="out of range for INT8"):
        oip.parse_infer(request, SIGNATURE, 100)


def test_binary_bytes_stay_bytes_and_text_must_be_utf8() -> None:
    png = b"\x89PNG\xff\x00"
    request = pb.ModelInferRequest(model_name="img")
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        png
    )
    inference, _ = oip.parse_infer(request, IMAGE, 100)
    assert inference.inputs["image"].tolist() == [png]
    text = _request("BYTES", raw=False)
    text.inputs[0].contents.bytes_contents[0] = b"\xff"
    with pytest.raises(InvalidInput, match="not UTF-8"):
        oip.parse_infer(text, SIGNATURE, 100)


def test_answers_use_the_form_of_the_request() -> None:
    results = {"label": np.array([3, 9]), "probabilities": np.array([[0.25, 0.75]], np.float32)}
    inference = Inference("r1", {})
    typed = oip.encode_infer(IMAGE, inference, results, raw=False)
    assert (typed.model_name, typed.model_version, typed.id) == ("img", "1", "r1")
    assert not typed.raw_output_contents
    assert list(typed.outputs[0].contents.int64_contents) == [3, 9]
    assert list(typed.outputs[1].contents.fp32_contents) == [0.25, 0.75]
    assert list(typed.outputs[1].shape) == [1, 2]
    raw = oip.encode_infer(IMAGE, inference, results, raw=True)
    assert not raw.outputs[0].HasField("contents")
    assert raw.raw_output_contents[0] == struct.pack("<2q", 3, 9)
    assert raw.raw_output_contents[1] == struct.pack("<2f", 0.25, 0.75)


def test_an_fp16_output_makes_every_output_raw() -> None:
    results = {"a": np.array([1], np.int64), "b": np.array([0.5], np.float16)}
    answer = oip.encode_infer(IMAGE, Inference(None, {}), results, raw=False)
    assert len(answer.raw_output_contents) == 2
    assert answer.raw_output_contents[1] == np.array([0.5], "<f2").tobytes()


def test_metadata_and_index() -> None:
    metadata = oip.model_metadata(SIGNATURE, ["1", "2"])
    assert (metadata.name, list(metadata.versions)) == ("all", ["1", "2"])
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("y", "FP32", [-1, 2])
    ]
    states = [("a", "1", ModelState.READY), ("a", "2", ModelState.LOADING)]
    assert [m.version for m in oip.repository_index(states, only_ready=False).models] == ["1", "2"]
    assert [m.state for m in oip.repository_index(states, only_ready=True).models] == ["READY"]
    assert "binary_tensor_data" in oip.server_metadata("n", "v").extensions


def test_sampling_parameters_are_checked() -> None:
    request = pb.ModelInferRequest()
    request.parameters["max_tokens"].int64_param = 8
    request.parameters["temperature"].double_param = 0.5
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    assert oip.sampling_parameters(request) == {"max_tokens": 8, "temperature": 0.5}
    for name, field, value in (
        ("max_tokens", "string_param", "8"),
        ("max_tokens", "double_param", 8.5),
        ("seed", "bool_param", True),
        ("colour", "string_param", "red"),
    ):
        bad = pb.ModelInferRequest()
        setattr(bad.parameters[name], field, value)
        with pytest.raises(InvalidInput, match=name):
            oip.sampling_parameters(bad)
