"""The gRPC front on a real grpc server in this process (threads), called through the stubs
protoc generated: keys and rate limits from metadata, errors as status codes with REST's
messages, typed contents, the model's deadline, streams that outlive a bad message, request
ids, and metrics by protocol. (tritonclient, gevent workers and NGINX: tests/e2e.)"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from app.keys import KeyStore, new_key
from app.metrics import Metrics
from app.middleware import Authenticator
from app.models.repository import Repository
from app.protocols.grpc import inference_pb2 as pb
from app.protocols.grpc import inference_pb2_grpc as pb_grpc
from app.ratelimit import RateLimiter, create_state
from app.server.grpc import start_server
from app.wsgi import build_repository
from tests import onnx_factory
from tests.conftest import DEMO_MODELS, make_settings
from tests.e2e.conftest import free_port

RECORD, TOKEN = new_key("ci")
SLOW_RECORD, SLOW_TOKEN = new_key("slow", rate=0.001, burst=1)
ROW = [0.5] * 30


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[pb_grpc.GRPCInferenceServiceStub, Metrics]]:
    tmp = tmp_path_factory.mktemp("grpc")
    models = tmp / "models"
    shutil.copytree(DEMO_MODELS / "tabular", models / "tabular")
    onnx_factory.save(onnx_factory.slow_loop(), models, "slow")
    (models / "slow" / "model.toml").write_text("timeout_ms = 100\nwarmup_runs = 0\n")
    settings = make_settings(models, server={"grpc_bind": f"127.0.0.1:{free_port()}"})
    repository: Repository = build_repository(settings)
    repository.load()
    keys = KeyStore({"ci": RECORD, "slow": SLOW_RECORD})
    state = tmp / "rl.bin"
    create_state(state, len(keys.keys))
    metrics = Metrics()
    gate = Authenticator(keys, RateLimiter(state), settings.auth.rate, settings.auth.burst)
    server = start_server(settings, repository, metrics, gate)
    channel = grpc.insecure_channel(settings.server.grpc_bind)
    # Another worker's server on the same address (SO_REUSEPORT lets every worker listen).
    second = start_server(settings, repository, Metrics(), gate)
    second.stop(grace=None)
    try:
        yield pb_grpc.GRPCInferenceServiceStub(channel), metrics
    finally:
        channel.close()
        server.stop(grace=None)


def _stub(
    served: tuple[pb_grpc.GRPCInferenceServiceStub, Metrics],
) -> pb_grpc.GRPCInferenceServiceStub:
    return served[0]


def _tabular(**fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tabular", **fields)  # type: ignore[arg-type]
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 30])
    tensor.contents.fp32_contents.extend(ROW)
    return request


KEY = (("authorization", f"Bearer {TOKEN}"),)


def test_health_needs_no_key_and_the_rest_does(served) -> None:  # type: ignore[no-untyped-def]
    stub = _stub(served)
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    for call, request in (
        (stub.ModelInfer, _tabular()),
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="tabular")),
        (stub.RepositoryIndex, pb.RepositoryIndexRequest()),
    ):
        with pytest.raises(grpc.RpcError) as denied:
            call(request, metadata=(("authorization", "Bearer wrong"),))
        assert denied.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "a valid API key is required" in denied.value.details()
    assert stub.ModelInfer(_tabular(), metadata=KEY).model_version == "2"
    assert stub.ModelInfer(_tabular(), metadata=(("x-api-key", TOKEN),)).model_name == "tabular"


def test_a_keys_rate_limit_is_resource_exhausted(served) -> None:  # type: ignore[no-untyped-def]
    stub = _stub(served)
    slow = (("x-api-key", SLOW_TOKEN),)
    stub.ModelInfer(_tabular(), metadata=slow)
    with pytest.raises(grpc.RpcError) as limited:
        stub.ModelInfer(_tabular(), metadata=slow)
    assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit" in limited.value.details()


def test_typed_contents_answer_typed_and_match_onnxruntime(served) -> None:  # type: ignore[no-untyped-def]
    answer = _stub(served).ModelInfer(_tabular(id="mine"), metadata=KEY)
    assert answer.id == "mine" and not answer.raw_output_contents
    session = ort.InferenceSession(str(DEMO_MODELS / "tabular" / "2" / "model.onnx"))
    label, probabilities = session.run(None, {"input": np.array([ROW], np.float32)})
    outputs = {o.name: o for o in answer.outputs}
    assert list(outputs["label"].contents.int64_contents) == label.tolist()
    got = list(outputs["probabilities"].contents.fp32_contents)
    np.testing.assert_allclose(got, probabilities.reshape(-1), rtol=1e-6)


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (pb.ModelInferRequest(model_name="nope"), "NOT_FOUND", "model 'nope' is not served here"),
        (_tabular(model_version="9"), "NOT_FOUND", "model 'tabular' has no version '9'"),
        (pb.ModelInferRequest(model_name="tabular"), "INVALID_ARGUMENT", "input"),
    ],
)
def test_errors_are_status_codes_with_rests_messages(served, request_, code, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as failed:
        _stub(served).ModelInfer(request_, metadata=KEY)
    assert failed.value.code() is grpc.StatusCode[code]
    assert message in failed.value.details()


def test_the_models_deadline_is_deadline_exceeded(served) -> None:  # type: ignore[no-untyped-def]
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(0.5)
    request.inputs.add(name="n", datatype="INT64", shape=[]).contents.int64_contents.append(20000)
    with pytest.raises(grpc.RpcError) as late:
        _stub(served).ModelInfer(request, metadata=KEY, timeout=30)
    assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in late.value.details()


def test_a_stream_answers_each_message_and_outlives_a_bad_one(served) -> None:  # type: ignore[no-untyped-def]
    requests = [_tabular(id="1"), pb.ModelInferRequest(model_name="nope", id="2"), _tabular(id="3")]
    answers = list(_stub(served).ModelStreamInfer(iter(requests), metadata=KEY))
    assert [a.infer_response.id for a in answers] == ["1", "", "3"]
    assert answers[1].error_message == "model 'nope' is not served here"


def test_request_ids_metadata_and_index(served) -> None:  # type: ignore[no-untyped-def]
    stub = _stub(served)
    _, call = stub.ModelInfer.with_call(_tabular(), metadata=(*KEY, ("x-request-id", "grpc-42")))
    assert ("x-request-id", "grpc-42") in call.trailing_metadata()
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="tabular"), metadata=KEY)
    assert list(metadata.versions) == ["1", "2"] and metadata.inputs[0].name == "input"
    assert stub.ModelReady(pb.ModelReadyRequest(name="tabular", version="1"), metadata=KEY).ready
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), metadata=KEY)
    assert {(m.name, m.version) for m in index.models} == {
        ("tabular", "1"),
        ("tabular", "2"),
        ("slow", "1"),
    }


def test_metrics_count_grpc_calls_by_protocol(served) -> None:  # type: ignore[no-untyped-def]
    stub, metrics = served
    route = "/inference.GRPCInferenceService/ModelInfer"
    value = metrics.registry.get_sample_value
    ok = {
        "route": route,
        "method": "GRPC",
        "status": "200",
        "model": "tabular",
        "version": "2",
        "key": "ci",
    }
    before = value("onnx_appliance_requests_total", ok) or 0.0
    stub.ModelInfer(_tabular(), metadata=KEY)
    assert value("onnx_appliance_requests_total", ok) == before + 1
    missing = {"route": route, "model": "", "version": "", "code": "MODEL_NOT_FOUND"}
    before = value("onnx_appliance_errors_total", missing) or 0.0
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(pb.ModelInferRequest(model_name="nope"), metadata=KEY)
    assert value("onnx_appliance_errors_total", missing) == before + 1
    assert value(
        "onnx_appliance_request_duration_seconds_count",
        {"route": route, "model": "tabular", "version": "2"},
    )


def test_a_generation_model_streams_its_tokens(generation_repository: Repository) -> None:
    settings = make_settings(DEMO_MODELS, server={"grpc_bind": f"127.0.0.1:{free_port()}"})
    gate = Authenticator(KeyStore({}), None, 0, 1)
    server = start_server(settings, generation_repository, Metrics(), gate)
    try:
        with grpc.insecure_channel(settings.server.grpc_bind) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="smollm2", id="g1")
            prompt = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
            prompt.contents.bytes_contents.append(b"The capital of France is")
            request.parameters["max_tokens"].int64_param = 8
            request.parameters["temperature"].double_param = 0.0
            bad = pb.ModelInferRequest()
            bad.CopyFrom(request)
            bad.parameters["colour"].string_param = "red"
            answers = list(stub.ModelStreamInfer(iter([request, bad]), timeout=120))
    finally:
        server.stop(grace=None)
    *tokens, final, refused = answers
    assert len(tokens) >= 2  # token by token, not one answer at the end
    assert all(a.infer_response.id == "g1" for a in tokens)
    text = "".join(a.infer_response.outputs[0].contents.bytes_contents[0].decode() for a in tokens)
    generator = generation_repository.generator("smollm2")
    ids = generator.prompt("The capital of France is")
    alone = generator.generate(ids, generator.sampling(len(ids), max_tokens=8, temperature=0.0))
    assert text == alone.text()
    assert final.infer_response.parameters["triton_final_response"].bool_param
    assert not final.infer_response.outputs
    assert "unknown parameter 'colour'" in refused.error_message
