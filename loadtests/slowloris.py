"""Slow-loris clients: TLS connections that trickle request headers and never finish them.

``python -m loadtests.slowloris --port P --server-name N --ca CA --count 500`` opens the
connections, prints ``opened <n>`` once they are all up, sends one more header line on each
every second for ``--trickle-seconds``, then waits (up to ``--wait-seconds``) for the server
to close them and prints one JSON line: how many it closed and when the last one went.
Runs in its own process so that its work does not slow the clients being measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import socket
import ssl
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="hold slow-loris connections")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-name", required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--path", default="/v2/models/tabular/infer")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--trickle-seconds", type=float, default=5)
    parser.add_argument("--wait-seconds", type=float, default=30)
    args = parser.parse_args(argv)

    context = ssl.create_default_context(cafile=str(args.ca))
    socks: list[ssl.SSLSocket] = []
    opened_at = time.monotonic()
    for _ in range(args.count):
        raw = socket.create_connection((args.address, args.port), timeout=10)
        tls = context.wrap_socket(raw, server_hostname=args.server_name)
        tls.sendall(f"POST {args.path} HTTP/1.1\r\nHost: {args.server_name}\r\n".encode())
        socks.append(tls)
    print(f"opened {len(socks)}", flush=True)

    end = time.monotonic() + args.trickle_seconds
    n = 0
    while time.monotonic() < end:
        time.sleep(1)
        n += 1
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(f"X-Slow-{n}: {n}\r\n".encode())

    # Wait for the server to close each one: EOF, a reset, or an answer (408) then EOF.
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    open_count, last_closed = len(socks), 0.0
    deadline = time.monotonic() + args.wait_seconds
    while open_count and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            if not isinstance(sock, ssl.SSLSocket):
                continue
            try:
                data = sock.recv(4096)
            except ssl.SSLWantReadError:
                continue
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                selector.unregister(sock)
                sock.close()
                open_count -= 1
                last_closed = time.monotonic() - opened_at
    result = {
        "opened": len(socks),
        "closed_by_server": len(socks) - open_count,
        "last_closed_after_s": round(last_closed, 2),
    }
    print(json.dumps(result), flush=True)
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return 0


if __name__ == "__main__":
    sys.exit(main())
