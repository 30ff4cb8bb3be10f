"""API key records, the keys file and verification."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.keys import KeyFileError, KeyStore, new_key


def test_new_key_verifies_and_the_file_holds_no_secret(tmp_path: Path) -> None:
    record, token = new_key("ci", rate=5, burst=10)
    assert token.startswith("oa_ci_")
    path = tmp_path / "api-keys"
    KeyStore({"ci": record}).save(path)
    text = path.read_text()
    assert token.split("_", 2)[2] not in text
    assert path.stat().st_mode & 0o777 == 0o640
    store = KeyStore.load(path)
    key = store.verify(token)
    assert key is not None
    assert (key.id, key.rate, key.burst) == ("ci", 5.0, 10)


@pytest.mark.parametrize(
    "presented", ["", " ", "oa_ci_", "oa_ci_wrong", "oa_other_x", "xx_ci_secret", "garbage"]
)
def test_wrong_tokens_do_not_verify(presented: str) -> None:
    record, token = new_key("ci")
    store = KeyStore({"ci": record})
    assert store.verify(presented) is None
    assert store.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None


def test_missing_file_means_no_keys(tmp_path: Path) -> None:
    assert not KeyStore.load(tmp_path / "nope").enabled


@pytest.mark.parametrize(
    "line",
    [
        "ci",
        "ci md5$00$00",
        "ci sha256$zz$00",
        "CI sha256$00$" + "00" * 32,
        "ci sha256$00$" + "00" * 32 + " rate=fast",
        "ci sha256$00$" + "00" * 32 + " colour=red",
        "ci sha256$00$" + "00" * 32 + " burst=0",
    ],
)
def test_malformed_lines_are_refused_with_their_number(tmp_path: Path, line: str) -> None:
    path = tmp_path / "api-keys"
    path.write_text("# comment\n\n" + line + "\n")
    with pytest.raises(KeyFileError, match="line 3"):
        KeyStore.load(path)


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    record, _ = new_key("ci")
    path = tmp_path / "api-keys"
    path.write_text(f"{record.line()}\n{record.line()}\n")
    with pytest.raises(KeyFileError, match="repeats"):
        KeyStore.load(path)


@pytest.mark.parametrize("key_id", ["", "Upper", "has_underscore", "x" * 33, "-lead"])
def test_bad_ids(key_id: str) -> None:
    with pytest.raises(KeyFileError):
        new_key(key_id)
