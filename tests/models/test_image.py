"""Image models on the real digits model: decoding with Pillow and its refusals (not an image,
a format the model does not take, decompression bombs, truncated files), runs grouped by size
that keep the images' order, ranking, and the BYTES signature the protocols see."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.models.errors import InvalidInput, PayloadTooLarge, RepositoryError, UnsupportedInput
from app.models.image import ImageRunner
from app.models.onnx import ImageOptions, OnnxModel, RuntimeOptions
from app.models.runner import Runner
from tests import onnx_factory
from tests.conftest import DEMO_MODELS, ROOT

SAMPLES = ROOT / "packaging" / "demo" / "digits"
LABELS = [str(i) for i in range(10)]


def runner_for(path: Path, name: str = "digits", **options: object) -> ImageRunner:
    image = ImageOptions(**options)  # type: ignore[arg-type]
    labels = LABELS if name == "digits" else []
    model = OnnxModel(name, 1, path, RuntimeOptions(warmup_runs=1, image=image), labels=labels)
    model.load()
    return ImageRunner(Runner(model), image)


@pytest.fixture(scope="module")
def digits() -> ImageRunner:
    return runner_for(DEMO_MODELS / "digits" / "1" / "model.onnx", scores="probabilities")


def encoded(pixels: np.ndarray, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def sample(digit: int) -> bytes:
    return (SAMPLES / f"{digit}.png").read_bytes()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but carries only a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_the_signature_takes_encoded_images(digits: ImageRunner) -> None:
    (image,) = digits.signature.inputs
    assert (image.name, image.datatype, image.shape, image.raw) == ("image", "BYTES", (-1,), True)
    assert [o.name for o in digits.signature.outputs] == ["label", "probabilities"]
    assert list(digits.signature.labels) == LABELS


def test_samples_are_classified_as_their_digit(digits: ImageRunner) -> None:
    images = digits.decode([sample(d) for d in range(10)])
    assert all(i.dtype == np.uint8 and i.shape == (32, 32, 3) for i in images)
    ranked = digits.classify(images, top_k=3)
    assert [r.labels[0] for r in ranked] == LABELS
    for r in ranked:
        assert len(r.labels) == 3 and r.scores == sorted(r.scores, reverse=True)
        assert 0.0 <= r.scores[-1] <= r.scores[0] <= 1.0


def test_jpeg_and_other_sizes_read_like_the_png(digits: ImageRunner) -> None:
    seven = digits.decode([sample(7)])[0]
    large = np.asarray(Image.fromarray(seven).resize((200, 120), Image.BICUBIC))
    files = [encoded(seven, "JPEG", quality=95), encoded(large, "PNG"), encoded(large, "JPEG")]
    ranked = digits.classify(digits.decode(files), top_k=1)
    assert [r.labels[0] for r in ranked] == ["7", "7", "7"]


def test_images_of_different_sizes_keep_their_order(digits: ImageRunner) -> None:
    pictures = [digits.decode([sample(d)])[0] for d in range(4)]
    framed = [np.pad(p, ((4, 4), (4, 4), (0, 0)), constant_values=255) for p in pictures]
    mixed = [pictures[0], framed[1], pictures[2], framed[3]]
    together = digits.run(mixed)
    for i, picture in enumerate(mixed):
        alone = digits.run([picture])
        assert together["label"][i] == alone["label"][0]
        # A batch may add the 64 products of a logit in another order: a few float32 steps
        # of the logit, which a probability carries over relatively.
        np.testing.assert_allclose(
            together["probabilities"][i], alone["probabilities"][0], rtol=1e-4, atol=1e-7
        )
    assert together["label"].tolist() == [0, 1, 2, 3]


def test_predict_takes_bytes_and_refuses_text(digits: ImageRunner) -> None:
    files = np.array([sample(3), sample(8)], dtype=object)
    answer = digits.predict({"image": files}, ["label"])
    assert answer["label"].tolist() == [3, 8]
    with pytest.raises(InvalidInput, match="binary data"):
        digits.predict({"image": np.array(["not bytes"], dtype=object)})
    with pytest.raises(InvalidInput, match="one input"):
        digits.predict({"pixels": files})


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"hello, not a picture", InvalidInput, "is not an image"),
        (b"", InvalidInput, "is not an image"),
        (sample(1)[:200], InvalidInput, "cannot be decoded"),  # truncated
        (encoded(np.zeros((8, 8, 3), np.uint8), "GIF"), UnsupportedInput, "is GIF"),
        (encoded(np.zeros((8, 8, 3), np.uint8), "BMP"), UnsupportedInput, "is BMP"),
        (png_header(3000, 2000), PayloadTooLarge, "3000x2000 pixels"),
    ],
)
def test_bad_files_are_refused_with_a_clear_error(
    data: bytes, error: type[Exception], message: str
) -> None:
    runner = runner_for(DEMO_MODELS / "digits" / "1" / "model.onnx", max_pixels=1_000_000)
    with pytest.raises(error, match=message) as raised:
        runner.decode([sample(0), data], ["good.png", "upload"])
    assert "upload" in str(raised.value)


def test_pillows_own_bomb_limit_is_refused_too() -> None:
    # Past twice Pillow's MAX_IMAGE_PIXELS it refuses to open the file at all.
    runner = runner_for(DEMO_MODELS / "digits" / "1" / "model.onnx", max_pixels=1 << 28)
    with pytest.raises(PayloadTooLarge, match="too many pixels"):
        runner.decode([png_header(15000, 15000)])
    # Between the two of Pillow's limits it only warns: the warning is refused as well.
    with pytest.raises(PayloadTooLarge, match="too many pixels"):
        runner.decode([png_header(10000, 10000)])


def test_too_many_images_or_none(digits: ImageRunner) -> None:
    with pytest.raises(PayloadTooLarge, match="at most 16"):
        digits.decode([sample(0)] * 17)
    with pytest.raises(InvalidInput, match="at least one"):
        digits.decode([])


def test_a_fixed_size_graph_gets_exactly_its_pixels(tmp_path: Path) -> None:
    path = onnx_factory.save(onnx_factory.pixels_4x4(), tmp_path, "pixels")
    runner = runner_for(path, "pixels")
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    (decoded,) = runner.decode([encoded(picture, "PNG")])
    scores = runner.run([decoded])["scores"]
    assert scores.tolist() == [picture.reshape(-1).astype(np.float32).tolist()]
    with pytest.raises(InvalidInput, match="5 pixels high; the model takes 4"):
        runner.decode([encoded(np.zeros((5, 4, 3), np.uint8), "PNG")])


def test_a_graph_that_does_not_take_images_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="must be UINT8"):
        runner_for(DEMO_MODELS / "mlp" / "1" / "model.onnx", "mlp", input="input")
    with pytest.raises(RepositoryError, match="one input"):
        runner_for(DEMO_MODELS / "digits" / "1" / "model.onnx", input="pixels")
    with pytest.raises(RepositoryError, match="not an output"):
        runner_for(DEMO_MODELS / "digits" / "1" / "model.onnx", scores="logits")


def test_warm_up_decodes_every_format(digits: ImageRunner) -> None:
    digits.warm_up()  # raises if a format cannot be written and read back
