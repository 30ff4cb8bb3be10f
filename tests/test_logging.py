"""The JSON log chain, for the app's own lines and for gunicorn's."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap


def test_app_and_stdlib_lines_are_json_with_utc_timestamps() -> None:
    code = textwrap.dedent("""
        import logging, structlog
        from app.logging import configure_logging
        configure_logging("info", "json")
        structlog.contextvars.bind_contextvars(request_id="rid-1")
        structlog.get_logger("t").info("hello", answer=42)
        structlog.get_logger("t").debug("hidden")
        logging.getLogger("gunicorn.error").warning("from %s", "stdlib")
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert len(lines) == 2
    app_line, std_line = lines
    assert app_line["event"] == "hello"
    assert app_line["answer"] == 42
    assert app_line["request_id"] == "rid-1"
    assert app_line["level"] == "info"
    assert app_line["timestamp"].endswith("Z")
    assert std_line["event"] == "from stdlib"
    assert std_line["level"] == "warning"
    assert std_line["logger"] == "gunicorn.error"


def test_gunicorn_logger_renders_through_the_chain() -> None:
    from gunicorn.config import Config

    from app.logging import GunicornLogger

    logger = GunicornLogger(Config())
    handler = logger.error_log.handlers[0]
    record = logging.LogRecord(
        "gunicorn.error", logging.INFO, __file__, 1, "Booting %s", ("worker",), None
    )
    doc = json.loads(handler.format(record))
    assert doc["event"] == "Booting worker"
    assert doc["level"] == "info"
    assert logger.access_log.handlers == []


def test_access_lines_are_batched_and_the_rest_written_at_once() -> None:
    import io
    import time as clock

    from app.logging import ACCESS_LOGGER, BufferedLoggerFactory

    stream = io.BytesIO()
    factory = BufferedLoggerFactory(stream)
    access, other = factory(ACCESS_LOGGER), factory("app.models")
    access.info(b'{"event":"request","n":1}')
    assert stream.getvalue() == b""  # queued, not yet written
    other.info(b'{"event":"model_ready"}')  # written at once, after what was queued
    assert stream.getvalue().splitlines() == [
        b'{"event":"request","n":1}',
        b'{"event":"model_ready"}',
    ]
    access.info(b'{"event":"request","n":2}')
    deadline = clock.monotonic() + 2
    while b'"n":2' not in stream.getvalue() and clock.monotonic() < deadline:
        clock.sleep(0.01)
    assert stream.getvalue().endswith(b'{"event":"request","n":2}\n')  # the writer thread


def test_queued_lines_are_written_at_exit() -> None:
    code = textwrap.dedent("""
        import structlog
        from app.logging import configure_logging
        configure_logging("info", "json")
        for i in range(3):
            structlog.get_logger("app.access").info("request", n=i)
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert [json.loads(x)["n"] for x in result.stderr.splitlines()] == [0, 1, 2]


def test_python_warnings_are_one_json_line_each() -> None:
    code = textwrap.dedent("""
        import warnings
        import numpy as np
        from app.logging import configure_logging
        configure_logging("info", "json")
        np.array([1e39]).astype(np.float32)  # numpy's RuntimeWarning
        warnings.warn("something odd", UserWarning)
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(x["event"], x["category"], x["level"]) for x in lines] == [
        ("python_warning", "RuntimeWarning", "warning"),
        ("python_warning", "UserWarning", "warning"),
    ]
    assert lines[0]["message"] == "overflow encountered in cast"
    assert lines[1]["where"] == "<string>:7"


_REQUEST_LINES = """
import json, structlog, sys
from app.logging import ACCESS_LOGGER, configure_logging, log_request
configure_logging(sys.argv[1], "json")
fields = {"method": "POST", "route": "/r", "status": 200, "duration_ms": 0.5, "model": "m",
          "version": None, "key_id": "k", "request_id": "rid-7"}
# What the chain writes for the same request, whose fronts bind the id and key as they go.
structlog.contextvars.bind_contextvars(request_id="rid-7", key_id="k")
structlog.get_logger(ACCESS_LOGGER).info("request", **{**fields, "request_id": "other"})
structlog.get_logger(ACCESS_LOGGER).info("request", **fields)
structlog.contextvars.clear_contextvars()
log_request(dict(fields))
log_request(dict(fields, route="/healthz"), quiet=True)
structlog.get_logger("app.models").warning("after")
"""


def test_request_lines_are_the_lines_the_chain_writes() -> None:
    def lines(level: str) -> list[dict[str, object]]:
        result = subprocess.run(
            [sys.executable, "-c", _REQUEST_LINES, level],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return [json.loads(line) for line in result.stderr.splitlines()]

    differs, chain, direct, after = lines("info")
    assert differs["request_id"] == "other"  # the comparison can fail
    stamps = [line.pop("timestamp") for line in (chain, direct)]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", s) for s in stamps)
    assert direct == chain
    assert after["event"] == "after"  # in order with the other lines, quiet one dropped
    *_, quiet, _ = lines("debug")
    assert (quiet["route"], quiet["level"]) == ("/healthz", "debug")


def test_timestamps_are_utc_with_microseconds() -> None:
    from datetime import UTC, datetime, timedelta

    from app.logging import _add_timestamp

    for _ in range(1000):  # across second boundaries too, now and then
        before = datetime.now(UTC)
        stamp = _add_timestamp(None, "", {})["timestamp"]
        after = datetime.now(UTC)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
        # Truncated to the microsecond, as datetime's own clock reading is.
        at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert before - timedelta(microseconds=1) <= at <= after, (before, stamp, after)
