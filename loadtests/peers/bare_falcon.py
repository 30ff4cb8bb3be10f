"""The bare floor: Falcon answering constant JSON, run under the appliance's gunicorn settings.

It reads the body like a real handler would, and does nothing else: no validation, no model,
no logging, no metrics. What the appliance costs on top of it is the price of its features.

With ``BENCH_FLOOR_MODELS=1`` it is the *model floor* instead: the least a JSON model endpoint
does (parse the body, build the arrays, run the session with the appliance's session options,
write the outputs), still with no validation, limits, logging or metrics. The gap between the
two floors is what running a model costs in this server; the gap from the model floor to the
appliance is what its features cost.
"""

import os
from pathlib import Path
from typing import Any

import falcon
import numpy as np
import orjson

BODY = (
    b'{"model_name":"tabular","model_version":"2","outputs":[{"name":"label",'
    b'"datatype":"INT64","shape":[1],"data":[1]}]}'
)
DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "BYTES": object}
NAMES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "object": "BYTES"}


class Constant:
    def on_post(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        req.bounded_stream.read()
        resp.content_type = falcon.MEDIA_JSON
        resp.data = BODY

    def on_get(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        resp.data = b'{"ok":true}'


class Model:
    def __init__(self, root: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {
            p.parent.parent.name: ort.InferenceSession(str(p), options)
            for p in root.glob("*/1/model.onnx")
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        doc = orjson.loads(req.bounded_stream.read())
        feeds = {
            t["name"]: np.asarray(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"])
            for t in doc["inputs"]
        }
        session = self.sessions[name]
        outputs: list[dict[str, Any]] = [
            {
                "name": meta.name,
                "datatype": NAMES.get(str(value.dtype), "BYTES"),
                "shape": list(value.shape),
                "data": value.ravel().tolist(),
            }
            for meta, value in zip(session.get_outputs(), session.run(None, feeds), strict=True)
        ]
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({"model_name": name, "outputs": outputs})


app = falcon.App()
if os.environ.get("BENCH_FLOOR_MODELS") == "1":
    app.add_route("/v2/models/{name}/infer", Model(Path(os.environ["BENCH_MODEL_DIR"])))
else:
    app.add_route("/v2/models/{name}/infer", Constant())
app.add_route("/health", Constant())
