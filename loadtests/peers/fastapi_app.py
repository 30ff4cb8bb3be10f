"""The FastAPI peer, written the way the usual tutorials do it.

A pydantic request model, the onnxruntime session created once at start-up with default
options, a plain ``def`` handler (run in FastAPI's thread pool), default JSON. Served by
``uvicorn --workers N``. The model file comes from ``$BENCH_MODEL_DIR/<name>/1/model.onnx``.

``BENCH_INTRA_OP_THREADS`` set gives the sessions that many intra-op threads: the one tuning
that the tutorials leave out and that matters most when several workers share the cores
(the ``fastapi-tuned`` configuration of the benchmark).
"""

import os
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

MODEL_DIR = os.environ["BENCH_MODEL_DIR"]
DTYPES = {"FP32": np.float32, "INT64": np.int64, "BYTES": object}

app = FastAPI()
sessions: dict[str, ort.InferenceSession] = {}


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferRequest(BaseModel):
    inputs: list[Tensor]


@app.on_event("startup")
def load_models() -> None:
    options = ort.SessionOptions()
    if os.environ.get("BENCH_INTRA_OP_THREADS"):
        options.intra_op_num_threads = int(os.environ["BENCH_INTRA_OP_THREADS"])
    for name in os.listdir(MODEL_DIR):
        path = os.path.join(MODEL_DIR, name, "1", "model.onnx")
        if os.path.exists(path):
            sessions[name] = ort.InferenceSession(path, options)


@app.get("/health")
def health() -> dict[str, bool]:
    return {"ok": True}


@app.post("/v2/models/{name}/infer")
def infer(name: str, request: InferRequest) -> dict[str, Any]:
    session = sessions.get(name)
    if session is None:
        raise HTTPException(404, "no such model")
    feeds = {
        t.name: np.array(t.data, dtype=DTYPES[t.datatype]).reshape(t.shape) for t in request.inputs
    }
    outputs = session.run(None, feeds)
    return {
        "model_name": name,
        "outputs": [
            {"name": o.name, "shape": list(v.shape), "data": v.ravel().tolist()}
            for o, v in zip(session.get_outputs(), outputs)
        ],
    }
