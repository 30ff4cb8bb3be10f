"""Image models: encoded images in; decoding here, everything after it in the graph.

A model folder whose ``model.toml`` has an ``[image]`` table takes pictures. Its graph's image
input is UINT8 ``[-1, -1, -1, 3]`` (images, height, width, RGB) and does its own
preprocessing (resizing, grey levels, scaling), so what clients send needs no preparation
and training and serving cannot drift apart. :class:`ImageRunner` decodes the files with
Pillow: it refuses what is not an image, a format the model does not take, and an image that
declares more than ``max_pixels`` pixels, before a single pixel is decoded (decompression
bombs). Images of the same size run together; answers keep the order of the images.

To the protocols its signature is the image input as BYTES ``[-1]`` of binary data (one
encoded file per element: binary tensor data, or base64 in JSON), so OIP clients send files
as they are; :meth:`ImageRunner.classify` ranks the
class scores for the upload route.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.models.errors import InvalidInput, PayloadTooLarge, RepositoryError, UnsupportedInput
from app.models.onnx import ImageOptions
from app.models.runner import Runner
from app.models.signature import Signature, TensorSpec

#: Formats Pillow can be asked for in ``[image] formats``.
KNOWN_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass(frozen=True, slots=True)
class Ranked:
    """The best classes of one image, best first."""

    labels: list[str]
    scores: list[float]


class ImageRunner:
    """Serves an image model: decoding and size grouping around a runner.

    Args:
        runner: Runs the graph (the worker's kind of runner).
        options: ``[image]`` from ``model.toml``.

    Raises:
        RepositoryError: the graph does not take images as ``[image]`` says.
    """

    def __init__(self, runner: Runner, options: ImageOptions) -> None:
        self.runner = runner
        self.model = runner.model
        self.options = options
        graph = self.model.signature
        inputs = {s.name: s for s in graph.inputs}
        spec = inputs.get(options.input)
        if spec is None or len(inputs) != 1:
            raise RepositoryError(
                f"{self.model.label}: an image model takes one input, [image] input = "
                f"{options.input!r}; its inputs are {sorted(inputs)}"
            )
        if spec.datatype != "UINT8" or len(spec.shape) != 4 or spec.shape[3] not in (3, -1):
            raise RepositoryError(
                f"{self.model.label}: image input {spec.name!r} must be UINT8 "
                f"[images, height, width, 3]; it is {spec.datatype} {list(spec.shape)}"
            )
        self._sizes = spec.shape[1:3]
        outputs = {s.name: s for s in graph.outputs}
        if options.scores:
            if options.scores not in outputs:
                raise RepositoryError(
                    f"{self.model.label}: [image] scores {options.scores!r} is not an output"
                )
            scores = outputs[options.scores]
        else:
            found = [s for s in graph.outputs if s.datatype == "FP32" and len(s.shape) == 2]
            if len(found) != 1:
                raise RepositoryError(
                    f"{self.model.label}: set [image] scores to the output of class scores"
                )
            scores = found[0]
        classes = scores.shape[1]
        if graph.labels and classes > 0 and len(graph.labels) != classes:
            raise RepositoryError(
                f"{self.model.label}: labels has {len(graph.labels)} names for {classes} "
                f"scores of {scores.name!r}"
            )
        self._scores = scores.name
        self.signature = Signature(
            graph.name,
            graph.version,
            (TensorSpec(options.input, "BYTES", (-1,), raw=True),),
            graph.outputs,
            graph.labels,
            graph.description,
        )

    @property
    def timeout(self) -> float:
        """Default deadline of a request to this model, in seconds from its arrival."""
        return self.runner.timeout

    # -- files in ----------------------------------------------------------------------------

    def decode(self, files: Sequence[bytes], names: Sequence[str] = ()) -> list[np.ndarray]:
        """RGB pixels of each file, as UINT8 ``[height, width, 3]``.

        Args:
            files: Encoded images.
            names: What to call each file in errors (its upload name); "image i" if absent.

        Raises:
            InvalidInput: no file, or one that is not a readable image.
            UnsupportedInput: an image in a format the model does not take.
            PayloadTooLarge: more files than ``max_images``, or an image with more pixels
                than ``max_pixels``.
        """
        if not files:
            raise InvalidInput(f"model {self.model.name!r} needs at least one image")
        if len(files) > self.options.max_images:
            raise PayloadTooLarge(
                f"{len(files)} images; model {self.model.name!r} takes at most "
                f"{self.options.max_images} per request"
            )
        return [
            self._decode(data, names[i] if i < len(names) else f"image {i}")
            for i, data in enumerate(files)
        ]

    def _decode(self, data: bytes, name: str) -> np.ndarray:
        try:
            # Pillow warns, then raises, past its own pixel limit; ours is checked first.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=list(KNOWN_FORMATS)) as image:
                    if image.format not in self.options.formats:
                        raise UnsupportedInput(
                            f"{name} is {image.format}; model {self.model.name!r} takes "
                            f"{', '.join(self.options.formats)}"
                        )
                    width, height = image.size
                    if width * height > self.options.max_pixels:
                        raise PayloadTooLarge(
                            f"{name} is {width}x{height} pixels; model {self.model.name!r} "
                            f"takes at most {self.options.max_pixels} pixels per image"
                        )
                    self._check_size(name, height, width)
                    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, ValueError):
            raise InvalidInput(
                f"{name} is not an image (model {self.model.name!r} takes "
                f"{', '.join(self.options.formats)})"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise PayloadTooLarge(f"{name} declares too many pixels to decode") from None
        except OSError as exc:  # truncated or corrupt data
            raise InvalidInput(f"{name} cannot be decoded: {exc}") from None
        return pixels

    def _check_size(self, name: str, height: int, width: int) -> None:
        for got, fixed, what in ((height, self._sizes[0], "high"), (width, self._sizes[1], "wide")):
            if fixed > 0 and got != fixed:
                raise InvalidInput(f"{name} is {got} pixels {what}; the model takes {fixed}")

    # -- running -----------------------------------------------------------------------------

    def run(
        self,
        images: Sequence[np.ndarray],
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """The graph's outputs for decoded images, one row per image in their order.

        Images of the same size share a session run.
        """
        names = list(outputs or [s.name for s in self.signature.outputs])
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, pixels in enumerate(images):
            groups.setdefault(pixels.shape, []).append(i)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        order: list[int] = []
        for members in groups.values():
            batch = np.stack([images[i] for i in members])
            answer = self.runner.predict({self.options.input: batch}, names, deadline)
            for name in names:
                parts[name].append(answer[name])
            order += members
        inverse = np.argsort(np.array(order))
        return {name: np.concatenate(parts[name])[inverse] for name in names}

    def classify(
        self, images: Sequence[np.ndarray], top_k: int, deadline: float | None = None
    ) -> list[Ranked]:
        """The ``top_k`` best classes of each image (at most as many as there are).

        Raises:
            InvalidInput: ``top_k`` below 1.
        """
        if top_k < 1:
            raise InvalidInput("top_k must be at least 1")
        return self.rank(self.scores(images, deadline), top_k)

    @property
    def scores_output(self) -> str:
        """The output of class scores that :meth:`classify` ranks."""
        return self._scores

    def scores(self, images: Sequence[np.ndarray], deadline: float | None = None) -> np.ndarray:
        """The class scores of each image, one row per image."""
        return self.run(images, [self._scores], deadline)[self._scores]

    def rank(self, scores: np.ndarray, top_k: int) -> list[Ranked]:
        """The ``top_k`` best classes of each row of ``scores``."""
        labels = self.signature.labels or [str(i) for i in range(scores.shape[1])]
        ranked = []
        for row in scores:
            best = np.argsort(-row, kind="stable")[:top_k]
            ranked.append(Ranked([labels[i] for i in best], [float(row[i]) for i in best]))
        return ranked

    def predict(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Tensors in, tensors out, for the protocols: encoded images as BYTES in.

        Raises:
            InvalidInput, UnsupportedInput, PayloadTooLarge: inputs that do not fit.
        """
        name = self.options.input
        if set(inputs) != {name}:
            raise InvalidInput(f"model {self.model.name!r} takes one input, {name!r}")
        files = inputs[name]
        if files.ndim != 1:
            raise InvalidInput(f"input {name!r} must be a list of encoded images ([-1])")
        self.signature.check_outputs(list(outputs or ()))
        if not all(isinstance(f, bytes) for f in files):
            raise InvalidInput(f"input {name!r} takes encoded images as binary data")
        return self.run(self.decode(list(files)), outputs, deadline)

    def warm_up(self) -> None:
        """Decode one image of each accepted format and run it: the first upload then pays
        for neither Pillow's plugins nor the graph's first run at a real size."""
        height, width = (s if s > 0 else 28 for s in self._sizes)
        picture = Image.new("RGB", (width, height), (255, 255, 255))
        files = []
        for fmt in self.options.formats:
            buffer = io.BytesIO()
            picture.save(buffer, format=fmt)
            files.append(buffer.getvalue())
        self.run(self.decode(files))
