"""Make sure Redis answers on REDIS_URL; start a private one under var/ when possible."""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Any
from urllib.parse import urlsplit

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def keeps_appendonly_file(url: str) -> bool:
    """True when Redis writes an append-only file (or CONFIG is disabled there, so nobody can tell)."""
    try:
        return redis.Redis.from_url(url, socket_timeout=2).config_get("appendonly").get("appendonly") == "yes"
    except redis.ResponseError:
        return True


def private_server_command(port: int, directory: str) -> list[str]:
    """redis-server bound to loopback, writing an append-only file (fsync'd every second): usage
    entries not yet drained into the database and budget counters survive a crash or restart."""
    return [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--daemonize", "yes",
        "--dir", directory,
        "--pidfile", f"{directory}/redis.pid",
        "--logfile", f"{directory}/redis.log",
    ]  # fmt: skip


class Command(BaseCommand):
    help = "Check that Redis answers on REDIS_URL; start a private redis-server under var/ if not."

    def handle(self, *args: Any, **options: Any) -> None:
        url = settings.REDIS_URL
        if answers(url):
            self.stdout.write("Redis answers.")
            if not keeps_appendonly_file(url):
                self.stderr.write(
                    "Warning: this Redis keeps no append-only file: usage not yet written to the database is lost "
                    "if it crashes. Set `appendonly yes` in its configuration."
                )
            return
        parts = urlsplit(url)
        if parts.scheme != "redis" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise CommandError(f"Redis does not answer at {parts.hostname}:{parts.port}; start it or fix REDIS_URL.")
        if shutil.which("redis-server") is None:
            raise CommandError(
                "Redis does not answer and redis-server is not installed: run `apt-get install redis-server` "
                "(or set REDIS_URL to a running Redis)."
            )
        directory = settings.VAR_DIR / "redis"
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(private_server_command(parts.port or 6379, str(directory)), check=True)
        for _ in range(50):
            if answers(url):
                self.stdout.write(f"Started a private Redis on port {parts.port or 6379} (files in {directory}).")
                return
            time.sleep(0.1)
        raise CommandError(f"Started redis-server but it does not answer; see {directory}/redis.log")
