"""Liveness of the parts the console needs: the database, Redis and at least one worker; and
whether billing is whole (no usage entry set aside, Redis keeping an append-only file)."""

from __future__ import annotations

from typing import Any

import redis
from django.conf import settings
from django.db import connection
from django.utils import timezone

from appliance.worker import alive_workers, redis_client


def check_database() -> dict[str, Any]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any driver error means "down"; its text says why
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "engine": connection.vendor}


def check_redis_and_workers() -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        client = redis_client()
        client.ping()
        workers = alive_workers(client)
    except redis.RedisError as exc:
        down = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return down, {"ok": False, "error": "Redis is unreachable, so worker heartbeats cannot be read."}
    nodes = sorted(set(workers.values()))
    worker = {
        "ok": bool(workers),
        "workers": sorted(workers),
        "nodes": nodes,
        "this_node": settings.NODE_NAME in nodes,
    }
    if not workers:
        worker["error"] = "No Celery worker has sent a heartbeat recently."
    return {"ok": True}, worker


def check_billing() -> dict[str, Any]:
    """Usage entries set aside (the database refused them), entries waiting in the stream, and
    whether Redis writes an append-only file (without one a crash of Redis loses what the drain has
    not written yet). A warning, not "down": requests are still served and billed."""
    from tenancy.models import SetAsideUsage
    from tenancy.usage import STREAM

    state: dict[str, Any] = {"persistent": None, "backlog": None}
    try:
        state["set_aside"] = SetAsideUsage.objects.count()
    except Exception:  # the database is down: check_database says so
        state["set_aside"] = 0
    try:
        client = redis_client()
        state["backlog"] = client.xlen(STREAM)
        state["persistent"] = client.config_get("appendonly").get("appendonly") == "yes"
    except redis.RedisError:  # down (check_redis says so) or CONFIG disabled: unknown
        pass
    state["ok"] = not state["set_aside"] and state["persistent"] is not False
    return state


def check_backup() -> dict[str, Any]:
    """The last backup's outcome; overdue when the newest good one is older than twice the interval."""
    from appliance.models import Backup

    try:
        last = Backup.objects.first()
        good = Backup.objects.filter(status=Backup.Status.OK).first()
    except Exception:  # the database is down: check_database says so
        return {"status": None, "at": None, "overdue": False}
    interval = settings.BACKUP_INTERVAL_HOURS * 3600
    age = (timezone.now() - good.created_at).total_seconds() if good else None
    return {
        "status": last.status if last else None, "at": last.created_at if last else None,
        "error": last.error if last else "", "good_at": good.created_at if good else None,
        "overdue": bool(interval) and (age is None or age > 2 * interval),
    }  # fmt: skip


def report() -> dict[str, Any]:
    database = check_database()
    redis_state, worker = check_redis_and_workers()
    return {
        "ok": database["ok"] and redis_state["ok"] and worker["ok"],
        "database": database,
        "redis": redis_state,
        "worker": worker,
        "billing": check_billing(),
        "backup": check_backup(),
        "node": settings.NODE_NAME,
    }
