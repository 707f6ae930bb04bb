"""API key format: a fixed prefix, a random body of 192 bits, and a checksum, so that a leaked key
can be recognised by scanners and a mistyped or truncated one refused without a database lookup.

    sk-apc-<id: 10 chars><secret: 22 chars>_<crc32 of everything before it, 6 chars base62>

Only a hash of the whole key is stored; the id (part of the random body) finds the row, and the
hash is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import zlib
from dataclasses import dataclass

PREFIX = "sk-apc-"
ALPHABET = string.digits + string.ascii_letters  # base62
ID_LENGTH = 10
BODY_LENGTH = 32  # 32 base62 characters ≈ 190 bits
CHECKSUM_LENGTH = 6


class MalformedKey(ValueError):
    """Not a key of this console (wrong prefix, length, characters or checksum)."""


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(text: str) -> str:
    return _base62(zlib.crc32(text.encode()), CHECKSUM_LENGTH)


@dataclass(frozen=True)
class ParsedKey:
    key_id: str
    raw: str

    @property
    def hash(self) -> str:
        return hash_key(self.raw)


def generate() -> ParsedKey:
    body = "".join(secrets.choice(ALPHABET) for _ in range(BODY_LENGTH))
    head = PREFIX + body
    raw = f"{head}_{_checksum(head)}"
    return ParsedKey(body[:ID_LENGTH], raw)


def parse(raw: str) -> ParsedKey:
    """Check the shape and checksum; raises MalformedKey without revealing which part was wrong."""
    expected = len(PREFIX) + BODY_LENGTH + 1 + CHECKSUM_LENGTH
    if not isinstance(raw, str) or len(raw) != expected or not raw.startswith(PREFIX):
        raise MalformedKey("Malformed API key.")
    head, _, checksum = raw.rpartition("_")
    body = head[len(PREFIX) :]
    if len(body) != BODY_LENGTH or set(body + checksum) - set(ALPHABET):
        raise MalformedKey("Malformed API key.")
    if not hmac.compare_digest(checksum, _checksum(head)):
        raise MalformedKey("Malformed API key.")
    return ParsedKey(body[:ID_LENGTH], raw)


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def matches(raw: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_key(raw), stored_hash)


def redact(raw: str) -> str:
    """What logs and pages may show of a key."""
    return raw[: len(PREFIX) + 4] + "…" if raw.startswith(PREFIX) else "…"
