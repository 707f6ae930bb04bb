"""Celery tasks of tenancy: usage records from the Redis stream, budget rebuilds, GPU-hours."""

from __future__ import annotations

from celery import shared_task

from appliance.worker import redis_client
from tenancy import usage


@shared_task(name="tenancy.drain_usage", ignore_result=True)
def drain_usage() -> int:
    """One drainer at a time (a second beat tick waits for the next turn instead of racing)."""
    client = redis_client()
    lock = client.lock("usage:drain:lock", timeout=120, blocking=False)
    if not lock.acquire():
        return 0
    try:
        return usage.drain(client)
    finally:
        lock.release()


@shared_task(name="tenancy.rebuild_budgets", ignore_result=True)
def rebuild_budgets() -> bool:
    return usage.rebuild_budgets(redis_client())


@shared_task(name="tenancy.account_gpu_hours", ignore_result=True)
def account_gpu_hours() -> int:
    return usage.account_gpu_hours(redis_client())
