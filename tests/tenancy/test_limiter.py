"""The limiter against the real Redis: hundreds of parallel admissions never exceed a limit,
leases are released and reclaimed, settlement corrects a reservation both ways, budgets are
rebuilt after FLUSHDB, and an unreachable Redis denies with its own reason."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from django.conf import settings

from tenancy.limiter import Limiter, Limits


@pytest.fixture
def limiter(redis_db: redis.Redis) -> Limiter:
    return Limiter(redis.Redis.from_url(settings.REDIS_URL, max_connections=64))


def parallel(count: int, call: Any) -> list[Any]:
    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(lambda _: call(), range(count)))


def test_rpm_never_exceeded_under_parallel_admissions(limiter: Limiter) -> None:
    limits = Limits(rpm=60)  # burst: a sixth of a minute = 10 requests
    decisions = parallel(300, lambda: limiter.admit(1, limits, 0))
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 10
    denied = [d for d in decisions if not d.allowed]
    assert {d.limit for d in denied} == {"rpm"} and all(0 < d.retry_after <= 1.0 for d in denied)


def test_rpm_recovers_one_per_period(limiter: Limiter) -> None:
    limits = Limits(rpm=600)  # one per 100 ms, burst 100
    start = time.monotonic()
    burst = sum(limiter.admit(2, limits, 0).allowed for _ in range(150))
    assert 100 <= burst <= 100 + (time.monotonic() - start) / 0.1 + 1
    time.sleep(0.35)
    later = sum(limiter.admit(2, limits, 0).allowed for _ in range(10))
    assert 2 <= later <= 100 + (time.monotonic() - start) / 0.1 + 1 - burst


def test_tpm_reservations_never_exceed_the_minute(limiter: Limiter) -> None:
    limits = Limits(tpm=10_000)
    decisions = parallel(200, lambda: limiter.admit(3, limits, 300))
    assert sum(d.allowed for d in decisions) == 33  # 33 × 300 ≤ 10 000 < 34 × 300
    assert limiter.admit(3, limits, 20_000).limit == "tpm_request_too_large"


def test_concurrency_leases_under_parallel_load(limiter: Limiter) -> None:
    limits = Limits(concurrency=5)
    decisions = parallel(200, lambda: limiter.admit(4, limits, 0))
    held = [d for d in decisions if d.allowed]
    assert len(held) == 5 and {d.limit for d in decisions if not d.allowed} == {"concurrency"}
    limiter.release(4, limits, held[0])  # released in finally
    assert limiter.admit(4, limits, 0).allowed
    assert not limiter.admit(4, limits, 0).allowed


def test_expired_leases_are_reclaimed(limiter: Limiter) -> None:
    limits = Limits(concurrency=1)
    assert limiter.admit(5, limits, 0, lease_seconds=0.2).allowed  # its holder died without releasing
    assert not limiter.admit(5, limits, 0).allowed
    time.sleep(0.3)
    assert limiter.admit(5, limits, 0).allowed


def test_settlement_corrects_the_reservation_both_ways(limiter: Limiter) -> None:
    limits = Limits(tokens_per_day=1000)
    first = limiter.admit(6, limits, 600)  # prompt + max_tokens reserved
    assert first.allowed and first.remaining["tokens_per_day"] == 400
    assert limiter.admit(6, limits, 600).limit == "tokens_per_day"
    limiter.settle(6, limits, first, 100)  # the answer was short: 500 tokens come back
    second = limiter.admit(6, limits, 600)
    assert second.allowed and second.remaining["tokens_per_day"] == 300
    limiter.settle(6, limits, second, 850)  # longer than reserved (e.g. a prompt miscount): billed
    assert limiter.admit(6, limits, 60).limit == "tokens_per_day"
    assert limiter.admit(6, limits, 50).allowed


def test_release_on_error_gives_everything_back(limiter: Limiter) -> None:
    limits = Limits(tpm=1000, tokens_per_month=1000, concurrency=1)
    decision = limiter.admit(7, limits, 900)
    assert decision.allowed
    limiter.release(7, limits, decision)
    assert limiter.admit(7, limits, 900).allowed


def test_budget_rebuilt_after_redis_loses_its_data(limiter: Limiter, redis_db: redis.Redis) -> None:
    limits = Limits(tokens_per_day=1000)
    limiter.settle(8, limits, limiter.admit(8, limits, 900), 900)
    redis_db.flushdb()  # Redis restarted without persistence
    limiter.rebuild_budgets(8, day_used=900, month_used=900)  # from the usage records
    assert limiter.admit(8, limits, 200).limit == "tokens_per_day"
    assert limiter.admit(8, limits, 100).allowed


def test_unlimited_department(limiter: Limiter) -> None:
    assert all(limiter.admit(9, Limits(), 10**6).allowed for _ in range(50))


def test_key_limits_only_narrow() -> None:
    department = Limits(rpm=100, tpm=None, concurrency=4)
    key = Limits(rpm=500, tpm=1000, concurrency=None)
    assert department.narrowed(key) == Limits(rpm=100, tpm=1000, concurrency=4)


def test_redis_unreachable_denies_with_its_own_reason() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    limiter = Limiter(redis.Redis(port=port, socket_connect_timeout=0.2))
    decision = limiter.admit(1, Limits(rpm=10), 10)
    assert not decision.allowed and decision.limit == "redis_unavailable"


def test_a_keys_own_limits_count_for_that_key_alone(limiter: Limiter) -> None:
    """Department 100 rpm; key 1 has its own 6 rpm (burst 1): key 1 is held to it, key 2 is not, and the
    department's own counter only moves by what was admitted."""
    department = Limits(rpm=100, concurrency=3)
    narrow = Limits(rpm=6, concurrency=1)
    first = limiter.admit(11, department, 0, key_id=1, key_limits=narrow)
    assert first.allowed
    refused = limiter.admit(11, department, 0, key_id=1, key_limits=narrow)
    assert refused.limit == "key_rpm" and 0 < refused.retry_after <= 10
    assert all(limiter.admit(11, department, 0, key_id=2).allowed for _ in range(2))  # the key-less budget is intact
    assert limiter.admit(11, department, 0, key_id=2).limit == "concurrency"  # 3 leases held department-wide
    limiter.release(11, department, first)
    assert limiter.admit(11, department, 0, key_id=2).allowed  # the released lease left both sets


def test_key_tpm_settles_on_the_keys_counter(limiter: Limiter) -> None:
    department, narrow = Limits(tpm=100_000), Limits(tpm=1000)
    decision = limiter.admit(12, department, 900, key_id=5, key_limits=narrow)
    assert limiter.admit(12, department, 900, key_id=5, key_limits=narrow).limit == "key_tpm"
    limiter.settle(12, department, decision, 50)  # used far less than reserved: given back
    assert limiter.admit(12, department, 900, key_id=5, key_limits=narrow).allowed


def test_remaining_requests_count_down_from_the_minutes_limit(limiter: Limiter) -> None:
    """Beside ``x-ratelimit-limit-requests: 60``, the first request of a minute leaves 59 (not the 9
    left of the burst), and each one after it one fewer."""
    limits = Limits(rpm=60)
    assert [limiter.admit(31, limits, 0).remaining["requests"] for _ in range(3)] == [59, 58, 57]
