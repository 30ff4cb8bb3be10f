"""A bounded pool of HTTPS clients that keeps sending predictions and records every request.

Used by the fault drills (tests/e2e/test_drills.py) in-process and by the scale-out test from
inside a network namespace (``python -m loadtests.traffic ...``, results as JSON). Every
request opens its own TLS connection (verified against the given CA, SNI = ``server_name``)
and is counted exactly once: succeeded (HTTP 200) or failed (any other status, or an error).
Nothing is retried by the client, so a failure the server side lets through is seen.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Record:
    """One request: when it started and ended (monotonic seconds), its status, its version."""

    start: float
    end: float
    status: int  # 0: no HTTP answer (connection error, timeout)
    version: str = ""
    error: str = ""


@dataclass
class Report:
    """Every request a pool sent."""

    records: list[Record] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return len(self.records)

    @property
    def succeeded(self) -> int:
        return sum(r.status == 200 for r in self.records)

    @property
    def failed(self) -> int:
        return self.sent - self.succeeded

    @property
    def statuses(self) -> Counter[int]:
        return Counter(r.status for r in self.records)

    def failures(self) -> list[Record]:
        return [r for r in self.records if r.status != 200]

    def in_flight(self, at: float) -> int:
        """Requests started before ``at`` and not finished by then."""
        return sum(r.start <= at < r.end for r in self.records)

    def between(self, start: float, end: float = float("inf")) -> Report:
        """The requests that started in [start, end)."""
        return Report([r for r in self.records if start <= r.start < end])

    def percentile(self, q: float) -> float:
        """Latency percentile of successful requests, in seconds."""
        latencies = sorted(r.end - r.start for r in self.records if r.status == 200)
        if not latencies:
            return float("inf")
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))]

    def summary(self) -> str:
        return f"sent {self.sent}, succeeded {self.succeeded}, failed {self.failed}"

    def to_json(self) -> dict[str, Any]:
        return {"records": [r.__dict__ for r in self.records]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        return cls([Record(**r) for r in data["records"]])


class _Connection(http.client.HTTPSConnection):
    """HTTPS to ``address`` with ``server_name`` as SNI and Host."""

    def __init__(
        self, server_name: str, address: str, port: int, context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(server_name, port, timeout=timeout, context=context)
        self._address = address
        self._context = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        # As curl and browsers do: without it, Nagle holds the request behind the handshake's
        # last flight until the server's delayed ACK (40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class Traffic:
    """Client threads sending one POST each, back to back, until stopped or out of time.

    Args:
        address: IP address to connect to.
        port: TCP port.
        server_name: Name for SNI, Host and certificate verification.
        ca: CA file that verifies the server.
        path: Request path.
        body: Request body (JSON).
        threads: Concurrent clients.
        max_seconds: Hard bound on the run, whatever happens.
        timeout: Per-request timeout in seconds.
        headers: Extra request headers.
        pause: Seconds each client waits between requests.
        vary: Called before each request for headers that change per request.
        rate: Most requests started per second by all clients together (0: no limit). Each
            request's connection stays in TIME_WAIT on the client side for a minute, so an
            unpaced pool on a real network exhausts its ~28k local ports within minutes.
    """

    def __init__(
        self,
        address: str,
        port: int,
        server_name: str,
        ca: Path,
        path: str,
        body: bytes,
        *,
        threads: int = 8,
        max_seconds: float = 120,
        timeout: float = 30,
        headers: dict[str, str] | None = None,
        pause: float = 0.0,
        vary: Callable[[], dict[str, str]] | None = None,
        rate: float = 0.0,
    ) -> None:
        self._target = (server_name, address, port)
        self._context = ssl.create_default_context(cafile=str(ca))
        self._path, self._body = path, body
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._timeout, self._pause, self._vary = timeout, pause, vary
        self._deadline = 0.0
        self._interval = 1 / rate if rate > 0 else 0.0
        self._next_start = 0.0
        self._max_seconds = max_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._threads = [
            threading.Thread(target=self._client, daemon=True, name=f"traffic-{i}")
            for i in range(threads)
        ]

    def __enter__(self) -> Traffic:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._deadline = time.monotonic() + self._max_seconds
        for thread in self._threads:
            thread.start()

    def stop(self) -> Report:
        """Stop sending; wait for requests in flight; return everything sent so far."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self._timeout + 5)
        return self.report()

    def report(self) -> Report:
        with self._lock:
            return Report(list(self._records))

    def _wait_turn(self) -> float:
        """Seconds until this client's next start under ``rate`` (claims that start)."""
        with self._lock:
            now = time.monotonic()
            start = max(self._next_start, now)
            self._next_start = start + self._interval
        return start - now

    def _client(self) -> None:
        server_name, address, port = self._target
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            if self._interval and (self._stop.wait(self._wait_turn()) or self._stop.is_set()):
                break
            start = time.monotonic()
            status, version, error = 0, "", ""
            conn = _Connection(server_name, address, port, self._context, self._timeout)
            try:
                headers = {**self._headers, **self._vary()} if self._vary else self._headers
                conn.request("POST", self._path, body=self._body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                status = response.status
                if status == 200:
                    version = str(json.loads(payload).get("model_version", ""))
                else:
                    error = payload[:200].decode(errors="replace")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            finally:
                conn.close()
            with self._lock:
                self._records.append(Record(start, time.monotonic(), status, version, error))
            if self._pause:
                self._stop.wait(self._pause)


def main(argv: list[str] | None = None) -> int:
    """Run a pool until ``--stop-file`` appears or ``--max-seconds`` pass; write JSON."""
    parser = argparse.ArgumentParser(description="bounded HTTPS prediction traffic")
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--server-name", required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--path", default="/v2/models/tabular/infer")
    parser.add_argument("--body", required=True, help="request body (JSON text)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s in all (0: no limit)")
    parser.add_argument("--stop-file", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    traffic = Traffic(
        args.address,
        args.port,
        args.server_name,
        args.ca,
        args.path,
        args.body.encode(),
        threads=args.threads,
        max_seconds=args.max_seconds,
        timeout=args.timeout,
        rate=args.rate,
    )
    started = time.monotonic()
    traffic.start()
    while not args.stop_file.exists() and time.monotonic() - started < args.max_seconds:
        time.sleep(0.05)
    report = traffic.stop()
    args.out.write_text(json.dumps({"clock": time.monotonic(), **report.to_json()}))
    print(report.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
