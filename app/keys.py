"""API keys: a file of salted hashes, and constant-time verification.

A key looks like ``oa_<id>_<secret>``: the id says which hash to compare against, the secret
is 256 random bits. Keys that random cannot be guessed, so a salted SHA-256 is enough (a slow
password hash would only add milliseconds to every request); the file never holds a key, and
neither the key nor its hash is ever logged.

File format, one key per line (``#`` starts a comment)::

    <id> sha256$<salt hex>$<digest hex> [rate=<requests per second>] [burst=<requests>]
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from app.files import write_atomically
from app.ratelimit import LimitError, check_burst, check_rate

PREFIX = "oa"
ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_HEADER = (
    "# onnx-appliance API keys, managed by `onnx-appliance keys`.\n"
    "# <id> sha256$<salt>$<digest> [rate=<req/s>] [burst=<requests>]; no key is stored here.\n"
)
_DUMMY_SALT = b"\0" * 16


class KeyFileError(Exception):
    """The keys file cannot be read or written; the message is one line."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key's public record.

    Attributes:
        id: Name of the key, shown in logs and metrics.
        salt: Random salt of the hash.
        digest: SHA-256 of salt + secret.
        rate: Requests per second for this key (None: the default).
        burst: Bucket size for this key (None: the default).
    """

    id: str
    salt: bytes
    digest: bytes
    rate: float | None = None
    burst: int | None = None

    def line(self) -> str:
        """The key's line in the keys file."""
        parts = [self.id, f"sha256${self.salt.hex()}${self.digest.hex()}"]
        if self.rate is not None:
            parts.append(f"rate={self.rate:g}")
        if self.burst is not None:
            parts.append(f"burst={self.burst}")
        return " ".join(parts)


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def new_key(key_id: str, rate: float | None = None, burst: int | None = None) -> tuple[ApiKey, str]:
    """A fresh key: its record for the file and the token to hand over once.

    Raises:
        KeyFileError: the id is not ``[a-z0-9][a-z0-9-]{0,31}``, or the rate or burst is
            one the keys file could not be read back with (see :mod:`app.ratelimit`).
    """
    if not ID_RE.match(key_id):
        raise KeyFileError(f"key id {key_id!r} is invalid: use a-z, 0-9 and -, at most 32")
    try:
        if rate is not None:
            check_rate(rate, "--rate")
        if burst is not None:
            check_burst(burst, "--burst")
    except LimitError as exc:
        raise KeyFileError(str(exc)) from None
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    return ApiKey(key_id, salt, _digest(salt, secret), rate, burst), f"{PREFIX}_{key_id}_{secret}"


class KeyStore:
    """The configured keys, by id."""

    def __init__(self, keys: dict[str, ApiKey] | None = None) -> None:
        self.keys = dict(sorted((keys or {}).items()))
        # Rate-limit slots are the keys' positions in id order, the same in every worker.
        self.slots = {key_id: i for i, key_id in enumerate(self.keys)}

    @property
    def enabled(self) -> bool:
        """True when at least one key exists, so requests must carry one."""
        return bool(self.keys)

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        """Read a keys file; a missing file means no keys.

        Raises:
            KeyFileError: unreadable file or malformed line (named by number).
        """
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"keys file {path} cannot be read: {exc}") from None
        keys: dict[str, ApiKey] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                key = _parse(line)
            except LimitError as exc:
                raise KeyFileError(f"keys file {path} line {number}: {exc}") from None
            if key is None:
                raise KeyFileError(f"keys file {path} line {number} is malformed")
            if key.id in keys:
                raise KeyFileError(f"keys file {path} line {number} repeats key id {key.id!r}")
            keys[key.id] = key
        return cls(keys)

    def save(self, path: Path) -> None:
        """Write the file atomically with mode 0640."""
        body = _HEADER + "".join(f"{k.line()}\n" for k in self.keys.values())
        try:
            write_atomically(path, body.encode(), 0o640)
        except OSError as exc:
            raise KeyFileError(f"keys file {path} cannot be written: {exc}") from None

    def verify(self, token: str) -> ApiKey | None:
        """The key a presented token belongs to, or None; constant time in the secret."""
        prefix, _, rest = token.partition("_")
        key_id, _, secret = rest.partition("_")
        key = self.keys.get(key_id) if prefix == PREFIX else None
        # Hash even when the id is unknown, so timing does not tell ids apart.
        digest = _digest(key.salt if key else _DUMMY_SALT, secret)
        if key is not None and hmac.compare_digest(digest, key.digest) and secret:
            return key
        return None


def _parse(line: str) -> ApiKey | None:
    """The key on one line, or None when the line is malformed.

    Raises:
        LimitError: a well-formed rate or burst that is out of range.
    """
    fields = line.split()
    if len(fields) < 2 or not ID_RE.match(fields[0]):
        return None
    scheme, _, rest = fields[1].partition("$")
    salt_hex, _, digest_hex = rest.partition("$")
    try:
        salt, digest = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
    except ValueError:
        return None
    if scheme != "sha256" or len(digest) != 32 or not salt:
        return None
    options: dict[str, str] = {}
    for extra in fields[2:]:
        name, sep, value = extra.partition("=")
        if not sep or name not in ("rate", "burst") or name in options:
            return None
        options[name] = value
    try:
        rate = float(options["rate"]) if "rate" in options else None
        burst = int(options["burst"]) if "burst" in options else None
    except ValueError:
        return None
    if rate is not None:
        check_rate(rate)
    if burst is not None:
        check_burst(burst)
    return ApiKey(fields[0], salt, digest, rate, burst)
