"""Usage records: Redis stream → database in batches, roll-ups, idempotent re-drains, budget rebuild,
GPU-hours accounting."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import redis
from django.conf import settings

from tenancy import tasks, usage
from tenancy.limiter import Limiter, Limits
from tenancy.models import ApiKey, Department, UsageRecord, UsageRollup

pytestmark = pytest.mark.django_db


@pytest.fixture
def legal() -> tuple[Department, ApiKey]:
    department = Department.objects.create(name="Legal", tokens_per_day=1000)
    key, _raw = ApiKey.issue(department, "bot")
    return department, key


def _publish(client: redis.Redis, department: Department, key: ApiKey, n: int, **extra: object) -> None:
    for i in range(n):
        fields = {"department_id": department.pk, "key_id": key.pk, "deployment_id": None, "model": "tiny",
                  "endpoint": "chat/completions", "prompt_tokens": 10, "completion_tokens": i,
                  "latency_ms": 20.0, "ttft_ms": 5.0, "client": "10.0.0.7"} | extra  # fmt: skip
        usage.publish(client, usage.entry(**fields))


def test_drain_writes_records_and_rollups(redis_db: redis.Redis, legal: tuple) -> None:
    department, key = legal
    _publish(redis_db, department, key, 5)
    _publish(redis_db, department, key, 1, status=429, error="rpm", completion_tokens=0, prompt_tokens=0)
    assert usage.drain(redis_db, batch=4) == 6
    assert UsageRecord.objects.filter(department=department).count() == 6
    hour = UsageRollup.objects.get(period="hour", department=department, api_key=key, model="tiny")
    assert (hour.requests, hour.errors, hour.prompt_tokens, hour.completion_tokens) == (6, 1, 50, 10)
    day = UsageRollup.objects.get(period="day", department=department)
    assert day.requests == 6 and day.ttft_count == 6 and day.latency_ms_sum == pytest.approx(120.0)
    key.refresh_from_db()
    assert key.last_used_at is not None
    assert redis_db.xlen(usage.STREAM) == 0  # acknowledged and removed
    assert usage.drain(redis_db) == 0


def test_a_batch_written_twice_is_counted_once(redis_db: redis.Redis, legal: tuple) -> None:
    """A drainer that died after its commit but before XACK: the entries come back, nothing doubles."""
    department, key = legal
    _publish(redis_db, department, key, 3)
    usage._ensure_group(redis_db)
    (_stream, items), *_ = redis_db.xreadgroup(usage.GROUP, "dead", {usage.STREAM: ">"}, count=10)
    messages = [(mid.decode(), {k.decode(): v.decode() for k, v in fields.items()}) for mid, fields in items]
    assert usage._write(messages) == 3  # committed, then the drainer died: never acknowledged
    assert usage._write(messages) == 0
    assert UsageRollup.objects.get(period="day").requests == 3


def test_pending_entries_of_a_dead_drainer_are_claimed(redis_db: redis.Redis, legal: tuple) -> None:
    department, key = legal
    _publish(redis_db, department, key, 2)
    usage._ensure_group(redis_db)
    redis_db.xreadgroup(usage.GROUP, "dead", {usage.STREAM: ">"}, count=10)  # read, never written
    assert usage.drain(redis_db) == 0  # still within the idle time: the dead drainer might be slow
    entries = redis_db.xpending_range(usage.STREAM, usage.GROUP, "-", "+", 10)
    redis_db.xclaim(usage.STREAM, usage.GROUP, "dead", 0, [e["message_id"] for e in entries], idle=60_000)
    assert usage.drain(redis_db) == 2


def test_records_of_unknown_departments_are_kept_without_rollups(redis_db: redis.Redis) -> None:
    """A refused request with a bad key has no department; a department deleted meanwhile is dropped."""
    usage.publish(redis_db, usage.entry(department_id=None, key_id=None, deployment_id=None, model="tiny",
                                        endpoint="chat/completions", status=401, error="invalid_api_key"))  # fmt: skip
    usage.publish(redis_db, usage.entry(department_id=999, key_id=999, deployment_id=999, model="tiny",
                                        endpoint="chat/completions"))  # fmt: skip
    assert usage.drain(redis_db) == 2
    assert set(UsageRecord.objects.values_list("department_id", "status")) == {(None, 401), (None, 200)}
    assert not UsageRollup.objects.exists()


def test_drain_task_runs_one_drainer_at_a_time(redis_db: redis.Redis, legal: tuple) -> None:
    department, key = legal
    _publish(redis_db, department, key, 2)
    lock = redis_db.lock("usage:drain:lock", timeout=10)
    assert lock.acquire(blocking=False)
    assert tasks.drain_usage() == 0
    lock.release()
    assert tasks.drain_usage() == 2


def test_budgets_rebuilt_after_flushdb(redis_db: redis.Redis, legal: tuple) -> None:
    department, key = legal
    limiter = Limiter(redis_db)
    limits = department.limits()
    for _ in range(3):
        decision = limiter.admit(department.pk, limits, 300)
        limiter.settle(department.pk, limits, decision, 300)
        _publish(redis_db, department, key, 1, prompt_tokens=300, completion_tokens=0)
    usage.drain(redis_db)
    assert usage.rebuild_budgets(redis_db)  # first run: marks Redis as holding the budgets
    assert limiter.admit(department.pk, limits, 200).limit == "tokens_per_day"
    redis_db.flushdb()  # Redis restarted without persistence: the counters are gone
    assert limiter.admit(department.pk, Limits(tokens_per_day=1000), 50).allowed  # admitted before the rebuild
    assert tasks.rebuild_budgets()
    assert not tasks.rebuild_budgets()  # done once per loss
    assert limiter.admit(department.pk, limits, 100).limit == "tokens_per_day"  # 900 + 50 + 100 > 1000
    assert limiter.admit(department.pk, limits, 50).allowed


def test_gpu_hours_accumulate_for_ready_replicas(redis_db: redis.Redis, deployment_factory) -> None:
    from provisioning.models import EngineRuntime, Replica
    from tenancy.models import DeploymentHours

    deployment = deployment_factory(name="tiny")
    deployment.runtime = EngineRuntime.objects.create(
        node=settings.NODE_NAME, name="vllm", package="vllm", python_path="-"
    )
    deployment.save()
    on_cpu = deployment_factory(name="cpu-only")  # the CPU build: time, but no GPU-hours
    Replica.objects.create(deployment=deployment, ordinal=0, node=settings.NODE_NAME, gpu_ids=[0, 1], state="ready")
    Replica.objects.create(deployment=deployment, ordinal=1, node=settings.NODE_NAME, gpu_ids=[2], state="starting")
    Replica.objects.create(deployment=on_cpu, ordinal=0, node=settings.NODE_NAME, state="ready")
    assert usage.account_gpu_hours(redis_db) == 0  # the first tick only starts the clock
    redis_db.set(usage.GPU_TICK, f"{time.time() - 30:.3f}")
    assert usage.account_gpu_hours(redis_db) == 2
    row = DeploymentHours.objects.get(deployment=deployment)
    assert row.replica_seconds == pytest.approx(30, abs=1) and row.gpu_seconds == pytest.approx(60, abs=2)
    cpu = DeploymentHours.objects.get(deployment=on_cpu)
    assert cpu.replica_seconds == pytest.approx(30, abs=1) and cpu.gpu_seconds == 0
    assert row.start == datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
