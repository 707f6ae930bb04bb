"""Keeping two runs of the suite on one machine apart (a CI clone beside a working copy): each
checkout gets a tag, and with it its own node name (engines are found and stopped by node), Redis db
and PostgreSQL test database; var/test is per checkout already. Imported by tests/settings.py before
Django is set up, so no Django here."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
RUN = hashlib.sha256(str(ROOT).encode()).hexdigest()[:6]
CLAIM = "console:test-run"  # in the chosen db: which run holds it ("<tag> <pid>")
# Not db 0 (the console's own) nor those the benchmarks flush (7, 9, 10, 12).
CANDIDATES = (14, 13, 15, 11, 8, 6, 5, 4, 3, 2, 1)
CLAIM_SECONDS = 6 * 3600


def _holder_alive(value: bytes | None) -> bool:
    if not value:
        return False
    tag, _, pid = value.decode().partition(" ")
    if tag == RUN or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def choose_redis_url(host: str = "redis://127.0.0.1:6379") -> str:
    """The first candidate db no live run of another checkout holds; claimed for this run."""
    for db in CANDIDATES:
        client = redis.Redis.from_url(f"{host}/{db}", socket_connect_timeout=2)
        try:
            if _holder_alive(client.get(CLAIM)):
                continue
            client.set(CLAIM, f"{RUN} {os.getpid()}", ex=CLAIM_SECONDS)
        except redis.RedisError:
            return f"{host}/{CANDIDATES[0]}"  # Redis is down: the tests that need it will say so
        return f"{host}/{db}"
    raise RuntimeError("every test Redis db is held by another run: set TEST_REDIS_URL")


def claim(client: redis.Redis) -> None:
    """Claim the db again after a test emptied it (FLUSHDB took the claim with it)."""
    client.set(CLAIM, f"{RUN} {os.environ.get('TEST_RUN_PID', os.getpid())}", ex=CLAIM_SECONDS)
