"""The BentoML peer: a BentoML 1.4 service running the same ONNX files with onnxruntime.

Served with ``bentoml serve`` and the same number of worker processes; the request body is
the same Open Inference Protocol JSON the other servers get.
"""

import os
from typing import Any

import bentoml
import numpy as np
import onnxruntime as ort

MODEL_DIR = os.environ["BENCH_MODEL_DIR"]
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
DTYPES = {"FP32": np.float32, "INT64": np.int64, "BYTES": object}


@bentoml.service(workers=WORKERS)
class Appliance:
    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.sessions = {}
        for name in os.listdir(MODEL_DIR):
            path = os.path.join(MODEL_DIR, name, "1", "model.onnx")
            if os.path.exists(path):
                self.sessions[name] = ort.InferenceSession(path, options)

    @bentoml.api
    def infer(self, model: str, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        session = self.sessions[model]
        feeds = {
            t["name"]: np.array(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"])
            for t in inputs
        }
        outputs = session.run(None, feeds)
        return {
            "model_name": model,
            "outputs": [
                {"name": o.name, "shape": list(v.shape), "data": v.ravel().tolist()}
                for o, v in zip(session.get_outputs(), outputs)
            ],
        }
