"""What a Celery worker of the console does besides tasks: heartbeats and orphan recovery.

A worker writes ``worker:<hostname>`` in Redis every ``WORKER_HEARTBEAT_SECONDS`` with a time to
live of three beats; ``/healthz`` and the stale-job sweep read those keys.
"""

from __future__ import annotations

import logging
import threading

import redis
from celery.signals import worker_ready, worker_shutdown
from django.conf import settings

logger = logging.getLogger(__name__)

KEY_PREFIX = "console:worker:"
_stop = threading.Event()


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)


def beat_once(client: redis.Redis, hostname: str) -> None:
    # At least 10 s: a worker whose beat thread waited on a slow database write is not dead.
    ttl = max(settings.WORKER_HEARTBEAT_SECONDS * 3, 10)
    client.set(KEY_PREFIX + hostname, settings.NODE_NAME, ex=ttl)


def alive_workers(client: redis.Redis | None = None) -> dict[str, str]:
    """Workers whose heartbeat has not expired: ``{hostname: node}``."""
    client = client or redis_client()
    found: dict[str, str] = {}
    for key in client.scan_iter(match=KEY_PREFIX + "*", count=100):
        node = client.get(key)
        if node is not None:
            found[key.decode()[len(KEY_PREFIX) :]] = node.decode()
    return found


def _heartbeat_loop(hostname: str) -> None:
    from django.db import close_old_connections

    from nodes.registry import heartbeat

    client = redis_client()
    while not _stop.is_set():
        try:
            beat_once(client, hostname)
        except redis.RedisError as exc:
            logger.warning("worker heartbeat to Redis failed: %s", exc)
        try:  # the node registry: this box is alive, with what it has now
            heartbeat()
        except Exception as exc:  # a database hiccup must not end the heartbeat thread
            logger.warning("node heartbeat to the database failed: %s", exc)
        finally:
            close_old_connections()
        _stop.wait(settings.WORKER_HEARTBEAT_SECONDS)


@worker_ready.connect
def on_worker_ready(sender: object = None, **kwargs: object) -> None:
    from appliance.jobs import recover_orphans

    hostname = getattr(sender, "hostname", "") or ""
    failed = recover_orphans(hostname, f"The worker {hostname} restarted while this job was running.")
    if failed:
        logger.warning("marked %d job(s) left running by a previous %s as failed", failed, hostname)
    _stop.clear()
    threading.Thread(target=_heartbeat_loop, args=(hostname,), name="console-heartbeat", daemon=True).start()


@worker_shutdown.connect
def on_worker_shutdown(sender: object = None, **kwargs: object) -> None:
    _stop.set()
    try:  # a stop asked for (a restart, an upgrade) is not a lost box; a crash or a cut link still is
        from nodes.registry import expect_back

        expect_back()
    except Exception as exc:  # the database may be what is going away
        logger.warning("could not tell the registry this box's worker is stopping: %s", exc)
    hostname = getattr(sender, "hostname", "") or ""
    try:
        redis_client().delete(KEY_PREFIX + hostname)
    except redis.RedisError:
        pass  # the key expires on its own
