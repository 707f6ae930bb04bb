"""A real Celery worker process for the tests, on the test database and the tests' Redis db."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def database_url() -> str:
    """The URL of the database the tests are using right now (pytest-django's test database)."""
    config = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{config['NAME']}"
    user = config["USER"] or "postgres"
    return f"postgres://{user}@{config['HOST'] or '127.0.0.1'}:{config['PORT'] or 5432}/{config['NAME']}"


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


class WorkerProcess:
    """``celery worker`` in its own process group, so a test can kill it like a crash would."""

    def __init__(self, hostname: str, concurrency: int = 0, netns: str | None = None, **env: str) -> None:
        """``concurrency`` 0: the solo pool (one task at a time); N: N prefork processes, as ``make run``.
        ``netns``: inside that network namespace (another "box")."""
        self.hostname = hostname
        self.concurrency = concurrency
        self.netns = netns
        self.extra_env = env
        self.process: subprocess.Popen | None = None
        self.log = ROOT / "var" / "test" / f"{hostname.replace('@', '_')}.log"

    def start(self) -> WorkerProcess:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": database_url()}
        env["WORKER_HEARTBEAT_SECONDS"] = "1"
        env.update(self.extra_env)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        pool = ["--pool", "prefork", "--concurrency", str(self.concurrency)] if self.concurrency else ["--pool", "solo"]
        command = [*(["ip", "netns", "exec", self.netns] if self.netns else []), sys.executable, "-m", "celery", "-A",
                   "appliance", "worker", *pool]  # fmt: skip
        command += ["--hostname", self.hostname, "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group: what a crash or an OOM kill looks like."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """A warm shutdown (SIGTERM), as on Ctrl-C or a service stop."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
