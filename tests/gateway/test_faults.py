"""Faults, with real processes: Redis killed mid-stream and restarted, the console restarted under
load, a drain worker killed between its commit and its acknowledgement. Each ends the same way:
the usage in the database equals the answers the clients saw."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tenancy import usage
from tenancy.models import Department, UsageRecord
from tests.gateway.helpers import FakeEngineProcess
from tests.gateway.test_gateway import HELLO, department_on, own_gateway
from tests.models_catalog.helpers import free_port
from tests.workers import ROOT, database_url, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


class PrivateRedis:
    """A redis-server of the test's own, writing its append-only file on every write."""

    def __init__(self, folder: Path) -> None:
        self.port, self.folder = free_port(), folder
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        assert wait_for(self.answers, 10), "redis-server did not start"
        return self

    def answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path, settings: Any) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis").start()
    settings.REDIS_URL = server.url
    yield server
    server.kill()


def stream_chat(url: str, raw: str, tokens: int, seen: list) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": tokens, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {raw}"},
                      timeout=30) as response:  # fmt: skip
        chunks = [line for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
        seen.append((response.status_code, len(chunks)))


def drained_from(client: redis.Redis) -> list[UsageRecord]:
    usage.drain(client)
    return list(UsageRecord.objects.all())


def test_redis_killed_mid_stream_and_restarted(deployment_factory: Any, private_redis: PrivateRedis) -> None:
    slow = FakeEngineProcess(token_delay=0.05, tokens=30).start()
    try:
        with own_gateway() as gateway:
            raw = department_on(deployment_factory, slow)
            Department.objects.update(max_concurrency=3)
            seen: list = []
            clients = [threading.Thread(target=stream_chat, args=(gateway.url, raw, 30, seen)) for _ in range(3)]
            for client in clients:
                client.start()
            assert wait_for(lambda: slow.stats()["in_flight"] == 3, 10)
            time.sleep(0.3)
            private_redis.kill()  # mid-stream: admitted, answering, nowhere to settle
            for client in clients:
                client.join(30)
            assert seen == [(200, 30)] * 3  # the answers went on to the end

            private_redis.start()  # the same port and folder: the counters come back from the file
            store = redis.Redis.from_url(private_redis.url)
            # The gateway sends what it spooled without waiting for a request to come.
            assert wait_for(lambda: store.xlen(usage.STREAM) == 3, 15), store.xlen(usage.STREAM)
            records = drained_from(store)
            assert [(r.status, r.completion_tokens) for r in records] == [(200, 30)] * 3
            # The three concurrency leases were released by the replayed settlements.
            again: list = []
            clients = [threading.Thread(target=stream_chat, args=(gateway.url, raw, 2, again)) for _ in range(3)]
            for client in clients:
                client.start()
            for client in clients:
                client.join(30)
            assert again == [(200, 2)] * 3
    finally:
        slow.kill()


class Console:
    """The console's ASGI server (web pages and /v1) as ``make run`` starts it, on the test database."""

    def __init__(self, port: int, env: dict[str, str]) -> None:
        self.port, self.env = port, env
        self.process: subprocess.Popen | None = None

    def start(self) -> Console:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "appliance.asgi:application", "--port", str(self.port),
             "--log-level", "warning"], cwd=ROOT, env=self.env)  # fmt: skip
        url = f"http://127.0.0.1:{self.port}/healthz"
        assert wait_for(lambda: self._answers(url), 30), "the console did not start"
        return self

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            return httpx.get(url, timeout=1).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGTERM, as a service restart sends: requests in flight finish, then it exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


def test_console_restarted_under_load(deployment_factory: Any, settings: Any, tmp_path: Path,
                                      redis_db: redis.Redis) -> None:  # fmt: skip
    engine = FakeEngineProcess(token_delay=0.01, tokens=8).start()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": database_url(),
           "TEST_REDIS_URL": settings.REDIS_URL, "TEST_VAR_DIR": str(tmp_path),
           "SECRET_KEY": settings.SECRET_KEY}  # fmt: skip
    port = free_port()
    console = Console(port, env).start()
    try:
        raw = department_on(deployment_factory, engine)
        answered: list[int] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                while not stop.is_set():
                    body = {"model": "tiny", "messages": HELLO, "max_tokens": 8}
                    try:
                        response = http.post("/v1/chat/completions", json=body,
                                             headers={"Authorization": f"Bearer {raw}"})  # fmt: skip
                    except httpx.HTTPError:
                        time.sleep(0.05)  # the console is restarting: not answered
                        continue
                    if response.status_code == 200:
                        answered.append(response.json()["usage"]["completion_tokens"])

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: len(answered) >= 20, 20)
        console.stop()
        console = Console(port, env).start()
        before = len(answered)
        assert wait_for(lambda: len(answered) >= before + 20, 20)
        stop.set()
        for thread in threads:
            thread.join(20)
        expected = (len(answered), sum(answered))

        def billed() -> tuple[int, int]:
            records = [r for r in drained_from(redis_db) if r.status == 200]
            return len(records), sum(r.completion_tokens for r in records)

        assert wait_for(lambda: billed() == expected, 10), (billed(), expected)
    finally:
        console.stop()
        engine.kill()


KILLED_BEFORE_ACK = """
import os, signal, django
django.setup()
import redis
from django.conf import settings
from tenancy import usage
client = redis.Redis.from_url(settings.REDIS_URL)
client.xack = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # dies between commit and acknowledgement
usage.drain(client, consumer="doomed")
"""


def test_drain_worker_killed_between_commit_and_ack(redis_db: redis.Redis) -> None:
    department = Department.objects.create(name="Legal")
    for tokens in range(1, 6):
        redis_db.xadd(usage.STREAM, usage.entry(department_id=department.pk, key_id=None, deployment_id=None,
                                                model="tiny", endpoint="chat/completions",
                                                completion_tokens=tokens))  # fmt: skip
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": database_url()}
    done = subprocess.run([sys.executable, "-c", KILLED_BEFORE_ACK], cwd=ROOT, env=env, timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert UsageRecord.objects.count() == 5 and redis_db.xlen(usage.STREAM) == 5  # written, not acknowledged
    # Once the dead drainer's entries are idle long enough, the next drain claims them; none doubles.
    pending = redis_db.xpending_range(usage.STREAM, usage.GROUP, "-", "+", 10)
    redis_db.xclaim(usage.STREAM, usage.GROUP, "doomed", 0, [p["message_id"] for p in pending], idle=60_000)
    assert usage.drain(redis_db) == 0 and redis_db.xlen(usage.STREAM) == 0
    assert sorted(UsageRecord.objects.values_list("completion_tokens", flat=True)) == [1, 2, 3, 4, 5]
