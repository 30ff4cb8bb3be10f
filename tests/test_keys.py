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


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("burst=0", "burst = 0"),
        ("burst=-5", "burst = -5"),
        ("rate=-1", "rate = -1.0"),
        ("rate=nan", "rate = nan"),
        ("rate=1e-320", "rate = 1e-320"),
    ],
)
def test_out_of_range_limits_are_refused_with_their_line(
    tmp_path: Path, extra: str, fragment: str
) -> None:
    path = tmp_path / "api-keys"
    path.write_text("# comment\n\n" + "ci sha256$00$" + "00" * 32 + f" {extra}\n")
    with pytest.raises(KeyFileError, match="line 3") as info:
        KeyStore.load(path)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("rate", "burst"), [(None, 0), (None, -5), (-1.0, None), (float("nan"), None), (1e-320, None)]
)
def test_new_keys_refuse_limits_the_file_could_not_hold(
    rate: float | None, burst: int | None
) -> None:
    with pytest.raises(KeyFileError, match="is invalid"):
        new_key("ci", rate, burst)


def test_every_new_key_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "api-keys"
    records = [new_key(f"k{i}", rate, 7)[0] for i, rate in enumerate([0, 0.001, 0.0012345678, 1e6])]
    KeyStore({r.id: r for r in records}).save(path)
    assert [k.rate for k in KeyStore.load(path).keys.values()] == [0, 0.001, 0.00123457, 1e6]
