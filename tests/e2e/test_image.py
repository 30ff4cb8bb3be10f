"""The image gateway on a real server: uploads with curl -F, the same model through the stock
tritonclient with binary BYTES, and a worker that keeps serving after hostile uploads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http as triton

from tests.conftest import ROOT
from tests.e2e.conftest import Server
from tests.models.test_image import png_header

SAMPLES = ROOT / "packaging" / "demo" / "digits"


def curl_form(
    server: Server, *fields: str, path: str = "/v1/models/digits:classify"
) -> tuple[int, dict[str, Any]]:
    args = [arg for field in fields for arg in ("-F", field)]
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "30", *args, "-w", "\n%{http_code}", server.url + path],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    body, _, status = result.stdout.rpartition("\n")
    return int(status), json.loads(body)


def test_curl_uploads_are_classified(server: Server) -> None:
    status, body = curl_form(
        server, f"file=@{SAMPLES / '8.png'}", f"file=@{SAMPLES / '1.png'}", "top_k=2"
    )
    assert status == 200, body
    assert [r["file"] for r in body["results"]] == ["8.png", "1.png"]
    assert [r["predictions"][0]["label"] for r in body["results"]] == ["8", "1"]
    assert all(len(r["predictions"]) == 2 for r in body["results"])


def test_hostile_uploads_are_refused_and_the_worker_keeps_serving(
    server: Server, tmp_path: Path
) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(60000, 60000))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    for field, status in ((f"file=@{bomb}", 413), (f"file=@{junk}", 400)):
        for _ in range(4):  # every worker sees some
            got, body = curl_form(server, field)
            assert got == status, body
            assert body["request_id"]
    got, body = curl_form(server, f"file=@{SAMPLES / '6.png'}")
    assert got == 200 and body["results"][0]["predictions"][0]["label"] == "6"
    assert server.process.poll() is None


def test_tritonclient_sends_images_as_binary_bytes(server: Server) -> None:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    metadata = client.get_model_metadata("digits")
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    files = np.array([(SAMPLES / f"{d}.png").read_bytes() for d in (2, 5, 9)], dtype=object)
    image = triton.InferInput("image", [3], "BYTES")
    image.set_data_from_numpy(files, binary_data=True)
    result = client.infer(
        "digits", [image], outputs=[triton.InferRequestedOutput("label", binary_data=True)]
    )
    assert result.as_numpy("label").tolist() == [2, 5, 9]
