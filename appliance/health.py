"""Liveness of the parts the console needs: the database, Redis and at least one worker."""

from __future__ import annotations

from typing import Any

import redis
from django.conf import settings
from django.db import connection

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


def report() -> dict[str, Any]:
    database = check_database()
    redis_state, worker = check_redis_and_workers()
    return {
        "ok": database["ok"] and redis_state["ok"] and worker["ok"],
        "database": database,
        "redis": redis_state,
        "worker": worker,
        "node": settings.NODE_NAME,
    }
