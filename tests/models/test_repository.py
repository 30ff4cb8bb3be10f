"""Repository scanning, versions, model.toml and refusal of anything escaping the repository."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

from app.models.errors import ModelNotFound, ModelNotReady, RepositoryError
from app.models.onnx import RuntimeOptions
from app.models.repository import Repository
from app.models.runner import CooperativeRunner
from tests import onnx_factory
from tests.conftest import DEMO_MODELS

OPTS = RuntimeOptions(warmup_runs=1)


def scan(root: Path) -> Repository:
    return Repository.scan(root, OPTS)


def test_demo_repository_layout() -> None:
    repo = scan(DEMO_MODELS)
    assert repo.names == ["digits", "mlp", "regression", "sentiment", "tabular"]
    assert repo.entry("tabular").default_version == 2  # from model.toml
    assert repo.entry("tabular").config.labels == ["malignant", "benign"]
    assert not repo.ready


def test_newest_version_is_default(tmp_path: Path) -> None:
    for version in (1, 3, 10):
        onnx_factory.save(onnx_factory.fixed_shape(), tmp_path, "m", version)
    (tmp_path / "m" / ".ipynb_checkpoints").mkdir()  # hidden folders are not versions
    (tmp_path / "m" / "README.md").write_text("files beside the versions are left alone")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "README.txt").write_text("not a model")
    repo = scan(tmp_path)
    repo.load()
    assert repo.get("m").model.version == 10
    assert repo.get("m", "3").model.version == 3
    assert [m.version for m in repo.models()] == [1, 3, 10]


@pytest.mark.parametrize("version", ["4", "0", "01", "abc", "..", "1e3", "-1", ""])
def test_unknown_versions(tmp_path: Path, version: str) -> None:
    onnx_factory.save(onnx_factory.fixed_shape(), tmp_path, "m")
    repo = scan(tmp_path)
    repo.load()
    with pytest.raises(ModelNotFound):
        repo.get("m", version)


def test_not_ready_before_load(tmp_path: Path) -> None:
    onnx_factory.save(onnx_factory.fixed_shape(), tmp_path, "m")
    with pytest.raises(ModelNotReady):
        scan(tmp_path).get("m")


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "", "nope"])
def test_unknown_names(name: str) -> None:
    with pytest.raises(ModelNotFound):
        scan(DEMO_MODELS).get(name)


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("default_verison = 1\n", "default_verison"),
        ("default_version = 7\n", "default_version 7 does not exist"),
        ("intra_op_threads = 0\n", "intra_op_threads"),
        ("warmup_runs = -1\n", "warmup_runs"),
        ("inline_run_us = -1\n", "inline_run_us = -1 is invalid: must be from 0 to"),
        ("intra_op_threads = 100000\n", "intra_op_threads = 100000 is invalid"),
        ("inter_op_threads = 100000\n", "inter_op_threads = 100000 is invalid"),
        ("max_concurrency = 100000\n", "max_concurrency = 100000 is invalid"),
        ("timeout_ms = 100000000\n", "timeout_ms = 100000000 is invalid"),
        ("labels = 3\n", "labels"),
        ("default_version = \n", "unreadable"),
    ],
)
def test_bad_model_toml(tmp_path: Path, toml: str, fragment: str) -> None:
    onnx_factory.save(onnx_factory.fixed_shape(), tmp_path, "m")
    (tmp_path / "m" / "model.toml").write_text(toml)
    with pytest.raises(RepositoryError, match=fragment):
        scan(tmp_path)


def test_per_model_limits_and_threads(tmp_path: Path) -> None:
    onnx_factory.save(onnx_factory.two_inputs(), tmp_path, "m")
    (tmp_path / "m" / "model.toml").write_text(
        "max_batch_rows = 2\nintra_op_threads = 1\nwarmup_runs = 0\n"
    )
    model = next(scan(tmp_path).models())
    assert model.options.max_batch_rows == 2
    assert model.options.warmup_runs == 0


@pytest.mark.parametrize(
    ("layout", "fragment"),
    [
        ("empty", "holds no models"),
        ("no_versions", "has no version folders"),
        ("no_model_file", "has no model.onnx"),
        ("bad_name", "invalid name"),
        ("corrupt", "not a readable ONNX model"),
        ("zero", "folder '0' that is not a version"),
        ("leading_zero", "folder '01' that is not a version"),
        ("word", "folder 'v2' that is not a version"),
    ],
)
def test_bad_layouts(tmp_path: Path, layout: str, fragment: str) -> None:
    if layout == "no_versions":
        (tmp_path / "m").mkdir()
    elif layout == "no_model_file":
        (tmp_path / "m" / "1").mkdir(parents=True)
    elif layout == "bad_name":
        onnx_factory.save(onnx_factory.fixed_shape(), tmp_path, "bad name")
    elif layout in ("zero", "leading_zero", "word"):
        onnx_factory.save(onnx_factory.fixed_shape(), tmp_path, "m", 1)
        folder = {"zero": "0", "leading_zero": "01", "word": "v2"}[layout]
        shutil.copytree(tmp_path / "m" / "1", tmp_path / "m" / folder)
    elif layout == "corrupt":
        (tmp_path / "m" / "1").mkdir(parents=True)
        (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(RepositoryError, match=fragment):
        scan(tmp_path)


def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        scan(tmp_path / "missing")


def test_external_data_inside_the_version_folder_is_served(tmp_path: Path) -> None:
    path = onnx_factory.save(onnx_factory.with_external_data("bias.bin"), tmp_path, "ext")
    (path.parent / "bias.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    repo = scan(tmp_path)
    repo.load()
    out = repo.get("ext").predict({"x": np.zeros((1, 4), dtype=np.float32)})
    assert out["y"].tolist() == [[0.0, 1.0, 2.0, 3.0]]


def test_share_weights_needs_external_data(tmp_path: Path) -> None:
    path = onnx_factory.save(onnx_factory.with_external_data("bias.bin"), tmp_path, "ext")
    (path.parent / "bias.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (path.parent.parent / "model.toml").write_text("share_weights = true\n")
    onnx_factory.save(onnx_factory.fixed_shape(), tmp_path, "inside")
    (tmp_path / "inside" / "model.toml").write_text("share_weights = true\n")
    with pytest.raises(RepositoryError, match=r"'inside' version 1: share_weights needs the"):
        scan(tmp_path)
    (tmp_path / "inside" / "model.toml").unlink()
    repo = scan(tmp_path)
    assert repo.entry("ext").versions[1].options.share_weights
    assert not repo.entry("inside").versions[1].options.share_weights
    repo.load()
    out = repo.get("ext").predict({"x": np.ones((1, 4), dtype=np.float32)})
    assert out["y"].tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_share_weights_is_refused_for_quantized_weights(
    tmp_path: Path, generation_models_dir: Path
) -> None:
    # Unpacked, onnxruntime's MatMulNBits runs SmolLM2 ~25 times slower.
    shutil.copytree(generation_models_dir / "smollm2", tmp_path / "smollm2")
    toml = tmp_path / "smollm2" / "model.toml"
    toml.write_text("share_weights = true\n" + toml.read_text())
    with pytest.raises(RepositoryError, match="MatMulNBits weights unpacked"):
        scan(tmp_path)


@pytest.mark.parametrize(
    "location",
    [
        "../../secret.bin",
        "../secret.bin",
        "/etc/passwd",
        "sub/../../secret.bin",
        "link.bin",
        "missing.bin",
    ],
)
def test_external_data_outside_is_refused(tmp_path: Path, location: str) -> None:
    root = tmp_path / "repo"
    path = onnx_factory.save(onnx_factory.with_external_data(location), root, "ext")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 16)
    shutil.copy(secret, root / "secret.bin")
    shutil.copy(secret, root / "ext" / "secret.bin")
    (path.parent / "link.bin").symlink_to(secret)
    with pytest.raises(RepositoryError, match="external data"):
        scan(root)


def test_symlinks_out_of_the_repository_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    onnx_factory.save(onnx_factory.fixed_shape(), outside, "m")
    root = tmp_path / "repo"
    root.mkdir()
    (root / "m").symlink_to(outside / "m")
    with pytest.raises(RepositoryError, match="outside the repository"):
        scan(root)
    (root / "m").unlink()
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.onnx").symlink_to(outside / "m" / "1" / "model.onnx")
    with pytest.raises(RepositoryError, match="outside its folder"):
        scan(root)


def test_map_outputs_are_refused_with_a_hint(tmp_path: Path) -> None:
    onnx_factory.save(onnx_factory.zipmap_classifier(), tmp_path, "zm")
    repo = scan(tmp_path)
    with pytest.raises(RepositoryError, match="zipmap=False"):
        repo.load()
    assert not repo.ready


def test_single_file(tmp_path: Path) -> None:
    path = tmp_path / "my-model.onnx"
    path.write_bytes(onnx_factory.fixed_shape().SerializeToString())
    repo = Repository.single_file(path, OPTS)
    repo.load()
    assert repo.names == ["my-model"]
    assert repo.default_model == "my-model"
    with pytest.raises(RepositoryError, match="does not exist"):
        Repository.single_file(tmp_path / "nope.onnx", OPTS)


def test_default_model_must_exist() -> None:
    with pytest.raises(RepositoryError, match="default_model"):
        Repository.scan(DEMO_MODELS, OPTS, default_model="nope")


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[batching]\nmax_batch_size = 0\n", "max_batch_size"),
        ("[batching]\nmax_queue_delay_us = -1\n", "max_queue_delay_us"),
        ("[batching]\nmax_queue = 10000000\n", "max_queue = 10000000 is invalid"),
        ("[batching]\nmax_batch_size = 8\npreferred_batch_sizes = [16]\n", "outside"),
        ("[batching]\nmax_batch = 8\n", "max_batch"),
    ],
)
def test_bad_batching_config(tmp_path: Path, toml: str, fragment: str) -> None:
    onnx_factory.save(onnx_factory.two_inputs(), tmp_path, "m")
    (tmp_path / "m" / "model.toml").write_text(toml)
    with pytest.raises(RepositoryError, match=fragment):
        scan(tmp_path)


def test_batching_config_reaches_the_model(tmp_path: Path) -> None:
    onnx_factory.save(onnx_factory.two_inputs(), tmp_path, "m")
    (tmp_path / "m" / "model.toml").write_text(
        "[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 250\npreferred_batch_sizes = [4, 2]\n"
    )
    repo = scan(tmp_path)
    options = next(repo.models()).options.batching
    assert options is not None
    assert (options.max_batch_size, options.max_queue_delay, options.preferred_batch_sizes) == (
        8,
        0.00025,
        (2, 4),
    )
    assert repo.largest_batch == 8


def test_the_worker_chooses_the_runner(tmp_path: Path) -> None:
    onnx_factory.save(onnx_factory.fixed_shape(), tmp_path, "m")
    repo = scan(tmp_path)
    repo.load(CooperativeRunner)
    runner = repo.get("m")
    assert type(runner) is CooperativeRunner
    assert runner.signature is runner.model.signature


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[cache]\nmax_entries = 0\n", "max_entries"),
        ("[cache]\nmax_mib = 100000\n", "max_mib = 100000 is invalid"),
        ("[cache]\nttl = 5\n", "ttl"),
    ],
)
def test_bad_cache_config(tmp_path: Path, toml: str, fragment: str) -> None:
    onnx_factory.save(onnx_factory.two_inputs(), tmp_path, "m")
    (tmp_path / "m" / "model.toml").write_text(toml)
    with pytest.raises(RepositoryError, match=fragment):
        scan(tmp_path)


def test_each_version_answers_from_its_own_cache(tmp_path: Path) -> None:
    onnx_factory.save(onnx_factory.gather_table(), tmp_path, "m", 1)
    doubled = onnx_factory.gather_table()
    table = doubled.graph.initializer[0]
    table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table) * 2, table.name))
    onnx_factory.save(doubled, tmp_path, "m", 2)
    (tmp_path / "m" / "model.toml").write_text("[cache]\nmax_entries = 16\nmax_mib = 1\n")
    repo = scan(tmp_path)
    repo.load()
    options = repo.get("m", "1").model.options.cache
    assert options is not None and (options.max_entries, options.max_bytes) == (16, 1024 * 1024)
    row = {"idx": np.array([[1]], np.int64)}
    expected = {"1": [4.0, 5.0, 6.0, 7.0], "2": [8.0, 10.0, 12.0, 14.0]}
    for version in ("1", "2", "1", "2"):  # the second round comes from the caches
        assert repo.get("m", version).predict(row)["y"][0, 0].tolist() == expected[version]
    assert repo.get("m").predict(row)["y"][0, 0].tolist() == expected["2"]  # the default


def test_text_models_take_no_cache(tmp_path: Path) -> None:
    onnx_factory.save(onnx_factory.two_inputs(), tmp_path, "m")
    (tmp_path / "m" / "1" / "tokenizer.json").write_text("{}")
    (tmp_path / "m" / "model.toml").write_text('[text]\ntask = "embedding"\n[cache]\n')
    with pytest.raises(RepositoryError, match=r"\[cache\] is for tensor models"):
        scan(tmp_path)


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ('[image]\nformats = ["PNG", "HEIC"]', r"formats \['HEIC'\] are not among"),
        ("[image]\nformats = []", "are not among"),
        ("[image]\nmax_pixels = 0", "max_pixels"),
        ("[image]\nmax_pixels = 1_000_000_000", "max_pixels"),
        ("[image]\nmax_images = 0", "max_images"),
        ("[image]\ncolour = true", "unknown field"),
        (
            '[image]\n[text]\ntask = "embedding"',
            r"one of \[text\].*this one has \[text\], \[image\]",
        ),
        ("[image]\n[batching]\nmax_batch_size = 4", r"\[batching\] and \[cache\] are for tensor"),
        ("[image]\n[cache]\nmax_entries = 4", r"\[batching\] and \[cache\] are for tensor"),
    ],
)
def test_bad_image_config(tmp_path: Path, toml: str, fragment: str) -> None:
    shutil.copytree(DEMO_MODELS / "digits", tmp_path / "digits")
    (tmp_path / "digits" / "model.toml").write_text(toml)
    with pytest.raises(RepositoryError, match=fragment):
        scan(tmp_path)


def test_the_repository_serves_image_models(tmp_path: Path) -> None:
    shutil.copytree(DEMO_MODELS / "digits", tmp_path / "digits")
    onnx_factory.save(onnx_factory.fixed_shape(), tmp_path, "plain")
    repo = scan(tmp_path)
    assert repo.image_names == ["digits"]
    repo.load()  # warms each image model up with Pillow too
    runner = repo.image("digits")
    assert runner.options.formats == ("PNG", "JPEG")
    assert runner.signature.inputs[0].raw
    with pytest.raises(ModelNotFound, match="does not take images"):
        repo.image("plain")
    with pytest.raises(ModelNotFound, match="has no version '2'"):
        repo.image("digits", "2")
