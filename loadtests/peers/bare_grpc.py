"""The gRPC floor: grpcio's own server answering OIP ``ModelInfer`` with raw contents, and
nothing else (no validation, limits, logging, metrics or request ids).

It forks ``$BENCH_WORKERS`` processes that each import grpcio and onnxruntime after the fork
and serve ``$BENCH_GRPC_BIND`` together (``SO_REUSEPORT``), with a thread pool and sessions
made with the appliance's options, so it is the least a grpcio server running these models
does on this machine. The model files come from ``$BENCH_MODEL_DIR/<name>/1/model.onnx``.
"""

import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DTYPES = {"FP32": "float32", "FP64": "float64", "INT64": "int64"}
NAMES = {"float32": "FP32", "float64": "FP64", "int64": "INT64"}


def serve(root: Path, bind: str) -> None:
    import grpc
    import numpy as np
    import onnxruntime as ort

    from app.protocols.grpc import inference_pb2 as pb
    from app.protocols.grpc import inference_pb2_grpc as pb_grpc

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {
        p.parent.parent.name: ort.InferenceSession(str(p), options)
        for p in root.glob("*/1/model.onnx")
    }

    class Servicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        def ModelInfer(self, request: object, context: object) -> object:  # noqa: N802
            session = sessions[request.model_name]  # type: ignore[attr-defined]
            feeds = {
                t.name: np.frombuffer(raw, DTYPES[t.datatype]).reshape(list(t.shape))
                for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)  # type: ignore[attr-defined]
            }
            reply = pb.ModelInferResponse(model_name=request.model_name)  # type: ignore[attr-defined]
            for meta, value in zip(session.get_outputs(), session.run(None, feeds), strict=True):
                reply.outputs.add(
                    name=meta.name, datatype=NAMES[str(value.dtype)], shape=list(value.shape)
                )
                reply.raw_output_contents.append(np.ascontiguousarray(value).tobytes())
            return reply

    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 1)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    server.add_insecure_port(bind)
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


def main() -> None:
    root, bind = Path(os.environ["BENCH_MODEL_DIR"]), os.environ["BENCH_GRPC_BIND"]
    children = []
    for _ in range(int(os.environ.get("BENCH_WORKERS", "2"))):
        pid = os.fork()
        if pid == 0:
            serve(root, bind)
            os._exit(0)
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(c, signal.SIGTERM) for c in children])
    for child in children:
        os.waitpid(child, 0)
    sys.exit(0)


if __name__ == "__main__":
    main()
