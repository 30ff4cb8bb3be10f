"""The error vocabulary: every code has a status on every front, and NGINX speaks it too."""

from __future__ import annotations

import re

import pytest

from app.errors import (
    CODE_FOR_HTTP_STATUS,
    GRPC_STATUS,
    HTTP_STATUS,
    ErrorCode,
    code_for_http_status,
)
from tests.conftest import ROOT

GRPC_CODES = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
}  # fmt: skip


def test_every_code_has_a_status_on_every_front() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert set(GRPC_STATUS) == set(ErrorCode)
    assert set(GRPC_STATUS.values()) <= GRPC_CODES
    assert all(400 <= status <= 599 for status in HTTP_STATUS.values())


def test_statuses_from_falcon_or_gunicorn_map_back_to_themselves() -> None:
    for status, code in CODE_FOR_HTTP_STATUS.items():
        assert HTTP_STATUS[code] == status


@pytest.mark.parametrize(("status", "code"), [(411, "INVALID_INPUT"), (502, "INTERNAL")])
def test_other_statuses_fall_into_their_class(status: int, code: str) -> None:
    assert code_for_http_status(status) == code


@pytest.mark.parametrize("template", ["onnx-appliance.conf.j2", "onnx-appliance-lb.conf.j2"])
def test_nginx_error_pages_use_the_codes_with_their_statuses(template: str) -> None:
    text = (ROOT / "nginx" / template).read_text()
    pages = re.findall(r"return (\d{3}) '\{[^']*\"error_code\":\"([A-Z_]+)\"", text)
    assert len(pages) >= 4
    for status, code in pages:
        assert code in ErrorCode.__members__, code
        assert HTTP_STATUS[ErrorCode(code)] == int(status), (status, code)
