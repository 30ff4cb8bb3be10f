"""Image uploads: ``POST /v1/models/{m}[/versions/{v}]:classify`` with ``multipart/form-data``.

A thin front: it reads the body within the limits, takes the files out of the form with
Falcon's multipart parser, and hands them to the model's
:class:`~app.models.image.ImageRunner`, which decodes, runs and ranks them.
"""

from __future__ import annotations

import io
from typing import cast

import falcon
from falcon.media.multipart import MultipartFormHandler, MultipartParseOptions

from app.errors import ErrorCode
from app.models.errors import InvalidInput, PayloadTooLarge
from app.models.image import ImageRunner
from app.protocols import schema
from app.protocols.image import encode_classify
from app.resources.common import (
    RepositoryResource,
    deadline,
    label,
    mirror,
    read_body,
    require_media_type,
)
from app.resources.openapi import INFERENCE_ERRORS, documented

_E = ErrorCode
MULTIPART = frozenset({"multipart/form-data"})
FILE_FIELD = "file"
DEFAULT_TOP_K = 3
_FORM = {
    "type": "object",
    "properties": {
        FILE_FIELD: {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Images (PNG or JPEG, as the model's [image] formats say); one "
            "part each, with a file name.",
        },
        "top_k": {
            "type": "integer",
            "minimum": 1,
            "default": DEFAULT_TOP_K,
            "description": "How many classes to answer per image, best first.",
        },
    },
    "required": [FILE_FIELD],
}
_ERRORS = (*INFERENCE_ERRORS, _E.INVALID_INPUT, _E.PAYLOAD_TOO_LARGE, _E.UNSUPPORTED_MEDIA_TYPE)


class ClassifyResource(RepositoryResource):
    """``POST /v1/models/{model}:classify``: the best classes of each uploaded image."""

    @documented(
        "Classify uploaded images",
        response=schema.ClassifyResponse,
        form=_FORM,
        errors=_ERRORS,
        deadline=True,
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response, model: str) -> None:
        """Rank the classes of each image in the form, with the model in the path."""
        self._classify(req, resp, model, None)

    @documented(
        "Classify uploaded images with one version",
        response=schema.ClassifyResponse,
        form=_FORM,
        errors=_ERRORS,
        deadline=True,
    )
    def on_post_versioned(
        self, req: falcon.Request, resp: falcon.Response, model: str, version: str
    ) -> None:
        """Rank the classes of each image in the form, with the version in the path."""
        self._classify(req, resp, model, version)

    def _classify(
        self, req: falcon.Request, resp: falcon.Response, model: str, version: str | None
    ) -> None:
        require_media_type(req, MULTIPART)
        runner = self._repository.image(model, version, routing_key=req.context.request_id)
        label(req, runner.signature)
        body = read_body(req, self._limits)
        names, files, top_k = self._form(req, body, runner.options.max_images)
        images = runner.decode(files, names)
        scores = runner.scores(images, deadline(req, runner))
        output = runner.scores_output
        mirror(
            req, self._repository, runner, {output: scores},
            lambda candidate, due: cast(ImageRunner, candidate).run(images, [output], due),
        )  # fmt: skip
        ranked = runner.rank(scores, top_k)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = schema.encode(encode_classify(runner.signature, names, ranked))

    def _form(
        self, req: falcon.Request, body: bytes, max_images: int
    ) -> tuple[list[str], list[bytes], int]:
        """The uploaded files (names and contents) and ``top_k`` of the form.

        Raises:
            InvalidInput: a malformed form, a field other than the files and ``top_k``, or no
                file.
            PayloadTooLarge: more files than the model takes.
        """
        options = MultipartParseOptions()
        options.max_body_part_count = max_images + 1  # the files, and top_k
        options.max_body_part_buffer_size = len(body)
        handler = MultipartFormHandler(options)
        names: list[str] = []
        files: list[bytes] = []
        top_k = DEFAULT_TOP_K
        try:
            form = handler.deserialize(io.BytesIO(body), req.content_type, len(body))
            for part in form:
                if part.name == "top_k" and not part.filename:
                    top_k = _top_k(part.text)
                elif part.name == FILE_FIELD:
                    if len(files) == max_images:
                        raise PayloadTooLarge(f"more than {max_images} files in the form")
                    names.append(part.secure_filename if part.filename else f"file {len(files)}")
                    files.append(part.get_data())
                else:
                    raise InvalidInput(
                        f"unexpected form field {part.name!r}: send the images as "
                        f"{FILE_FIELD!r} parts (and top_k)"
                    )
        except falcon.HTTPError as exc:
            # Falcon's parser reports a malformed form (or one with too many parts) this way.
            if "maximum number" in (exc.description or ""):
                raise PayloadTooLarge(f"more than {max_images} files in the form") from None
            raise InvalidInput(
                f"malformed multipart/form-data body: {exc.description or exc.title}"
            ) from None
        if not files:
            raise InvalidInput(f"no image in the form: send each as a {FILE_FIELD!r} part")
        return names, files, top_k


def _top_k(text: str | None) -> int:
    raw = (text or "").strip()
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise InvalidInput("top_k must be an integer from 1 to 1000")
    return int(raw)
