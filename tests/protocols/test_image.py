"""The ``:classify`` answer: each file's classes, best first, in upload order."""

from __future__ import annotations

import json

from app.models.image import Ranked
from app.models.signature import Signature, TensorSpec
from app.protocols import schema
from app.protocols.image import encode_classify

SIGNATURE = Signature(
    "digits", "1", (TensorSpec("image", "BYTES", (-1,), raw=True),),
    (TensorSpec("probabilities", "FP32", (-1, 10)),), tuple(str(i) for i in range(10)), "",
)  # fmt: skip


def test_classify_answer() -> None:
    ranked = [Ranked(["7", "9"], [0.9, 0.05]), Ranked(["1", "7"], [0.6, 0.3])]
    body = json.loads(schema.encode(encode_classify(SIGNATURE, ["a.png", "b.jpg"], ranked)))
    assert body == {
        "model_name": "digits",
        "model_version": "1",
        "results": [
            {"file": "a.png", "predictions": [{"label": "7", "score": 0.9},
                                              {"label": "9", "score": 0.05}]},
            {"file": "b.jpg", "predictions": [{"label": "1", "score": 0.6},
                                              {"label": "7", "score": 0.3}]},
        ],
    }  # fmt: skip
