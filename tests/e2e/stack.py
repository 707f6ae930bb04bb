"""The live console for the browser tests: uvicorn serving ``appliance.asgi:application`` and Celery
beat in processes of their own, beside a real worker (tests/workers.py), all on the test database,
the tests' Redis db and a node name of their own, with the simulated GPU source."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from django.conf import settings

from tests.models_catalog.helpers import free_port
from tests.runs import RUN
from tests.workers import ROOT, database_url

NODE = f"e2enode-{RUN}"  # apart from the other tests' node and other runs': engines are told apart by node


def stack_env(data_dir: Path) -> dict[str, str]:
    """The environment of every process of the live console (web, worker, beat)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_ALLOW_ASYNC_UNSAFE")}
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=database_url(),
        TEST_REDIS_URL=settings.REDIS_URL,
        TEST_VAR_DIR=str(settings.VAR_DIR),
        ENGINES_DIR=str(settings.ENGINES_DIR),
        NODE_NAME=NODE,
        DATA_DIR=str(data_dir),
        DISK_RESERVE_BYTES="0",
        GPU_SOURCE="simulated",
        GPU_SIMULATED_COUNT="2",
        GPU_SAMPLE_SECONDS="2",
        RECONCILE_SECONDS="2",
        USAGE_DRAIN_SECONDS="1",
        WORKER_HEARTBEAT_SECONDS="1",
        REPLICA_STOP_GRACE_SECONDS="5",
        PYTHONUNBUFFERED="1",
    )
    return env


class Process:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.name, self.command, self.env = name, command, env
        self.log = Path(settings.VAR_DIR) / f"e2e-{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Process:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def stop(self, grace: float = 15) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def output(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Console(Process):
    """The web process: pages, management API, /v1 gateway, /hf mirror, as ``make run`` serves them."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "uvicorn", "appliance.asgi:application", "--host", "127.0.0.1",
                   "--port", str(self.port)]  # fmt: skip
        super().__init__("web", command, {**env, "CONSOLE_PORT": str(self.port)})  # the playground's gateway

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Console:
        super().start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.output()
            try:
                httpx.get(self.url + "/healthz", timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("the console did not start: " + self.output())

    def access_log(self) -> list[str]:
        """Request lines uvicorn logged ("POST /deployments/new 302", ...)."""
        import re

        return [f"{m[0]} {m[1]}" for m in re.findall(r'"([A-Z]+ [^ ]+) HTTP/[\d.]+" (\d+)', self.output(10**7))]


class Beat(Process):
    """``celery beat`` with the console's schedule: reconcile, GPU collection, usage drain..."""

    def __init__(self, env: dict[str, str]) -> None:
        schedule = Path(settings.VAR_DIR) / "e2e-celerybeat-schedule"
        for stale in schedule.parent.glob(schedule.name + "*"):
            stale.unlink()
        command = [sys.executable, "-m", "celery", "-A", "appliance", "beat", "--loglevel", "INFO",
                   "--schedule", str(schedule)]  # fmt: skip
        super().__init__("beat", command, env)
