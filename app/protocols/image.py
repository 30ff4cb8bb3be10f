"""Image classification answers: the best classes of each upload, as ``:classify`` sends them."""

from __future__ import annotations

from collections.abc import Sequence

from app.models.image import Ranked
from app.models.signature import Signature
from app.protocols import schema


def encode_classify(
    signature: Signature, files: Sequence[str], ranked: Sequence[Ranked]
) -> schema.ClassifyResponse:
    """The answer to ``POST /v1/models/{m}:classify``: per file, its classes best first."""
    return schema.ClassifyResponse(
        model_name=signature.name,
        model_version=signature.version,
        results=[
            schema.ImageClasses(
                name,
                [
                    schema.ClassScore(label, score)
                    for label, score in zip(r.labels, r.scores, strict=True)
                ],
            )
            for name, r in zip(files, ranked, strict=True)
        ],
    )
