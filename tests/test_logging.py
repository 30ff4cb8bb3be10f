"""The JSON log chain, for the app's own lines and for gunicorn's."""

from __future__ import annotations

import json
import logging
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
