"""The bare floor: Falcon answering constant JSON, run under the appliance's gunicorn settings.

It reads the body like a real handler would, and does nothing else: no validation, no model,
no logging, no metrics. What the appliance costs on top of it is the price of its features.

With ``BENCH_FLOOR_MODELS=1`` it is the *model floor* instead: the least a JSON model endpoint
does (parse the body, build the arrays, run the session with the appliance's session options,
write the outputs), still with no validation, limits, logging or metrics. The gap between the
two floors is what running a model costs in this server; the gap from the model floor to the
appliance is what its features cost.

With ``BENCH_FLOOR_MODELS=guarded`` it is the *guarded floor*: the model floor plus the least
each per-request guardrail of the appliance needs, written as leanly as we know how in one
responder, with none of the appliance's code or layers: a request id echoed, a body size
limit, the inputs checked against the model (names, datatype, shape, lossless cast), the
run's options and deadline registered for a watchdog and admission counted, both under one
lock (no watchdog thread runs: its per-request cost is the registering), a per-process
metrics count and duration, and one JSON log line per request written in batches. It is a
lower bound for what those guardrails cost on this stack, not a server anyone should run.
"""

import _thread
import bisect
import collections
import itertools
import math
import os
import re
import sys
import time
import uuid
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
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.answer(name, session, session.run(None, feeds))

    @staticmethod
    def answer(name: str, session: Any, results: list[np.ndarray]) -> bytes:
        """The OIP response body for a session's results."""
        outputs: list[dict[str, Any]] = [
            {
                "name": meta.name,
                "datatype": NAMES.get(str(value.dtype), "BYTES"),
                "shape": list(value.shape),
                "data": value.ravel().tolist(),
            }
            for meta, value in zip(session.get_outputs(), results, strict=True)
        ]
        return orjson.dumps({"model_name": name, "outputs": outputs})


_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ONNX_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64"}
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Refused(Exception):
    """A request the guarded floor answers with 400."""


class Guarded(Model):
    def __init__(self, root: Path) -> None:
        import onnxruntime as ort

        super().__init__(root)
        self.run_options = ort.RunOptions
        self.specs = {
            name: {
                i.name: (
                    _ONNX_TYPES.get(i.type, "BYTES"),
                    [d if type(d) is int else -1 for d in i.shape],
                )
                for i in session.get_inputs()
            }
            for name, session in self.sessions.items()
        }
        self.lock = _thread.allocate_lock()  # never held across a wait: an OS lock is enough
        self.running = 0
        self.watched: dict[int, tuple[float, Any]] = {}
        self.tokens = itertools.count(1)
        self.prefix = uuid.uuid4().hex[:16]
        self.ids = itertools.count()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.durations = [0] * (len(_BUCKETS) + 1)
        self.lines: list[bytes] = []

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        start = time.perf_counter()
        given = req.get_header("X-Request-ID")
        rid = given if given and _ID_RE.match(given) else f"{self.prefix}{next(self.ids):016x}"
        resp.set_header("X-Request-ID", rid)
        try:
            resp.data = self.infer(req, name, start + 30.0)
            status = 200
        except (Refused, KeyError, ValueError, TypeError, FloatingPointError) as exc:
            resp.status = falcon.HTTP_400
            resp.data = orjson.dumps({"error": str(exc), "request_id": rid})
            status = 400
        resp.content_type = falcon.MEDIA_JSON
        took = time.perf_counter() - start
        self.requests[(name, status)] += 1
        self.durations[bisect.bisect_left(_BUCKETS, took)] += 1
        self.lines.append(
            orjson.dumps(
                {
                    "route": "/v2/models/{name}/infer",
                    "status": status,
                    "duration_ms": took * 1e3,
                    "model": name,
                    "request_id": rid,
                    "pid": os.getpid(),
                    "ts": time.time(),
                }
            )
        )
        if len(self.lines) >= 1000:
            sys.stderr.buffer.write(b"\n".join(self.lines) + b"\n")
            self.lines.clear()

    def infer(self, req: falcon.Request, name: str, deadline: float) -> bytes:
        length = req.content_length
        if length is None or length > 64 << 20:
            raise Refused("a body with a Content-Length within the limit is required")
        doc = orjson.loads(req.bounded_stream.read())
        specs = self.specs[name]
        feeds = {}
        for t in doc["inputs"]:
            datatype, dims = specs[t["name"]]
            shape = t["shape"]
            if t["datatype"] != datatype or len(shape) != len(dims):
                raise Refused(f"input {t['name']!r} does not fit the model")
            if any(d not in (-1, s) for d, s in zip(dims, shape, strict=True)):
                raise Refused(f"input {t['name']!r} has the wrong shape")
            raw = np.array(t["data"])
            if raw.dtype.kind not in "iuf" or raw.size != math.prod(shape):
                raise Refused(f"input {t['name']!r} has the wrong values")
            with np.errstate(over="raise"):
                feeds[t["name"]] = raw.astype(DTYPES[datatype], copy=False).reshape(shape)
        session = self.sessions[name]
        options = self.run_options()
        token = next(self.tokens)
        with self.lock:
            self.running += 1
            self.watched[token] = (deadline, options)
        try:
            results = session.run(None, feeds, options)
        finally:
            with self.lock:
                self.running -= 1
                del self.watched[token]
        return self.answer(name, session, results)


app = falcon.App()
floor_models = os.environ.get("BENCH_FLOOR_MODELS")
if floor_models == "guarded":
    app.add_route("/v2/models/{name}/infer", Guarded(Path(os.environ["BENCH_MODEL_DIR"])))
elif floor_models == "1":
    app.add_route("/v2/models/{name}/infer", Model(Path(os.environ["BENCH_MODEL_DIR"])))
else:
    app.add_route("/v2/models/{name}/infer", Constant())
app.add_route("/health", Constant())
