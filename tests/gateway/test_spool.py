"""The gateway's spool (gateway/accounting.py): settlements and usage entries Redis refused wait on
disk, in order, and reach Redis once it is back; a gateway that died with a spool leaves its file for
the next one to adopt."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import redis
import redis.asyncio
from django.conf import settings

from gateway.accounting import Spool
from tenancy import usage
from tenancy.limiter import AsyncLimiter, Limiter, Limits, settle_call

LIMITS = Limits(tokens_per_day=10_000, concurrency=1)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def entry(tokens: int) -> dict[str, str]:
    return usage.entry(department_id=7, key_id=None, deployment_id=None, model="tiny", endpoint="chat/completions",
                       completion_tokens=tokens)  # fmt: skip


def replay(spool: Spool, url: str) -> None:
    async def run() -> None:
        client = redis.asyncio.Redis.from_url(url)
        try:
            await spool.replay(client, AsyncLimiter(client))
        finally:
            await client.aclose()

    asyncio.run(run())


def test_a_dead_gateways_spool_is_adopted_and_replayed_in_order(redis_db: redis.Redis, tmp_path: Path) -> None:
    limiter = Limiter(redis_db)
    decision = limiter.admit(7, LIMITS, 500)
    assert decision.allowed and not limiter.admit(7, LIMITS, 10).allowed  # its lease is held
    folder = tmp_path / "spool"
    folder.mkdir()
    items = [{"settle": settle_call(7, LIMITS, decision, 40), "entry": entry(40)}, {"settle": None, "entry": entry(3)}]
    left = folder / f"gateway-{dead_pid()}.jsonl"
    left.write_bytes(b"".join(orjson.dumps(item) + b"\n" for item in items))
    alive = folder / "gateway-1.jsonl"  # pid 1 is running: its spool is its own
    alive.write_bytes(orjson.dumps({"settle": None, "entry": entry(99)}) + b"\n")

    spool = Spool(folder)
    spool.adopt()
    assert [item["entry"]["ct"] for item in spool.items] == ["40", "3"]
    assert not left.exists() and alive.exists() and spool.path.exists()  # now in this process's own file

    replay(spool, "redis://127.0.0.1:1/0")  # Redis still away: nothing is lost, nothing reordered
    assert len(spool.items) == 2 and len(spool.path.read_bytes().splitlines()) == 2

    replay(spool, settings.REDIS_URL)
    assert spool.items == [] and not spool.path.exists()
    assert [fields[b"ct"] for _, fields in redis_db.xrange(usage.STREAM)] == [b"40", b"3"]
    (day,) = redis_db.scan_iter("lim:*:day:*")
    assert int(redis_db.get(day)) == 40  # settled to what was used, not the 500 reserved
    assert limiter.admit(7, LIMITS, 10).allowed  # the lease was released by the replayed settlement


def test_spooled_items_survive_a_crash_of_the_gateway(tmp_path: Path) -> None:
    """Each item is on disk (fsync'd) when add() returns: a process killed right after loses nothing."""
    folder = tmp_path / "spool"
    code = (
        "import os, sys; from gateway.accounting import Spool; from pathlib import Path;"
        "s = Spool(Path(sys.argv[1])); s.add({'settle': None, 'entry': {'ct': '5'}}); os._exit(9)"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    prelude = "import django; django.setup();"
    done = subprocess.run([sys.executable, "-c", prelude + code, str(folder)], env=env, timeout=60)
    assert done.returncode == 9
    spool = Spool(folder)
    spool.adopt()
    assert spool.items == [{"settle": None, "entry": {"ct": "5"}}]
