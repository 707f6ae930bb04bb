"""API key format: prefix, 190-bit body, checksum; malformed keys refused before any lookup."""

from __future__ import annotations

import pytest

from tenancy.keys import PREFIX, MalformedKey, generate, hash_key, matches, parse, redact


def test_generated_keys_parse_and_are_unique() -> None:
    keys = {generate().raw for _ in range(1000)}
    assert len(keys) == 1000
    key = generate()
    assert key.raw.startswith(PREFIX) and parse(key.raw).key_id == key.key_id
    assert matches(key.raw, hash_key(key.raw)) and not matches(key.raw + "x", hash_key(key.raw))
    assert key.raw not in redact(key.raw) and redact(key.raw).startswith(PREFIX)


@pytest.mark.parametrize("mutate", ["truncate", "checksum", "body", "prefix", "empty", "spaces", "unicode"])
def test_malformed_keys(mutate: str) -> None:
    raw = generate().raw
    bad = {
        "truncate": raw[:-1],
        "checksum": raw[:-1] + ("A" if raw[-1] != "A" else "B"),
        "body": raw[: len(PREFIX)] + ("x" if raw[len(PREFIX)] != "x" else "y") + raw[len(PREFIX) + 1 :],
        "prefix": "sk-xyz-" + raw[len(PREFIX) :],
        "empty": "",
        "spaces": " " + raw[1:],
        "unicode": raw[:-2] + "é1",
    }[mutate]
    with pytest.raises(MalformedKey):
        parse(bad)
