"""Running the gateway and the FAKE engine for tests: a real uvicorn server in a thread of the test
process (so it reads the test database), and fake_engine.py in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from tests.models_catalog.helpers import free_port
from tests.processes import end

ROOT = Path(__file__).resolve().parents[2]


class ServerThread:
    """An ASGI app served by uvicorn on 127.0.0.1:<free port> from a thread."""

    def __init__(self, app: Any, close: Any = None) -> None:
        self.app, self.close = app, close
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        try:
            await self.server.serve()
        finally:
            if self.close is not None:
                await self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class FakeEngineProcess:
    """tests/gateway/fake_engine.py on a port of its own (a FAKE engine, see its docstring)."""

    def __init__(self, key: str = "replica-secret", netns: str | None = None, **options: Any) -> None:
        self.key, self.port = key, free_port()
        prefix = ["ip", "netns", "exec", netns] if netns else []  # on another "box": only it can reach it
        self.args = [*prefix, sys.executable, "-m", "tests.gateway.fake_engine", "--port", str(self.port), "--key", key]
        for name, value in options.items():
            self.args += [f"--{name.replace('_', '-')}", str(value)]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, probe: bool = True) -> FakeEngineProcess:
        self.process = subprocess.Popen(self.args, cwd=ROOT)
        deadline = time.monotonic() + 15
        while probe:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and self.process.poll() is None, "the fake engine did not start"
            time.sleep(0.05)
        return self

    def seen(self) -> list[dict]:
        return httpx.get(self.url + "/_fake/requests", timeout=5).json()

    def stats(self) -> dict:
        return httpx.get(self.url + "/_fake/stats", timeout=5).json()

    def reset(self) -> None:
        httpx.post(self.url + "/_fake/reset", timeout=5)

    def hold(self) -> None:
        httpx.post(self.url + "/_fake/hold", timeout=5)

    def release(self) -> None:
        httpx.post(self.url + "/_fake/release", timeout=5)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class BrokenEngine:
    """A FAKE engine that fails in one named way, as an engine killed mid-request does: ``reset``
    drops the connection (RST) once the request has arrived; ``truncate`` sends the head of a JSON
    answer and then closes; ``truncate_stream`` sends one event of a stream and then closes;
    ``reset_after_done`` sends a whole stream, ``[DONE]`` included, and resets before its last chunk. It
    counts the requests it got in ``hits``."""

    HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\n%s\r\n"

    def __init__(self, mode: str) -> None:
        assert mode in ("reset", "truncate", "truncate_stream", "reset_after_done"), mode
        self.mode, self.port, self.hits = mode, free_port(), 0
        self.key = "broken-secret"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.hits += 1
        if self.mode == "truncate":
            writer.write(self.HEAD % (b"application/json", b"Content-Length: 400\r\n") + b'{"id": "cmpl-')
        elif self.mode in ("truncate_stream", "reset_after_done"):
            event = b'data: {"choices": [{"index": 0, "delta": {"content": "tok "}}]}\n\n'
            if self.mode == "reset_after_done":
                event += b"data: [DONE]\n\n"
            writer.write(self.HEAD % (b"text/event-stream", b"Transfer-Encoding: chunked\r\n")
                         + b"%x\r\n%s\r\n" % (len(event), event))  # fmt: skip
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        writer.transport.abort()

    def start(self) -> BrokenEngine:
        self.thread.start()
        started = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", self.port), self.loop)
        self.server = started.result(10)
        return self

    def stop(self) -> None:
        # asyncio's Server is not thread-safe: closing it from this thread races the loop's own
        # detach of the last connection (both wake the waiters; the second finds them gone).
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class RelayProcess:
    """``manage.py relay`` (the real node relay) serving ``node``'s route table from ``data_dir``, on
    ``host``, optionally inside a network namespace (another "box")."""

    def __init__(
        self, data_dir: Path, node: str, host: str = "127.0.0.1", netns: str | None = None, port: int | None = None
    ) -> None:
        self.host, self.node, self.port = host, node, port or free_port()
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.args = [*prefix, sys.executable, "manage.py", "relay", "--host", host, "--port", str(self.port),
                     "--node", node]  # fmt: skip
        self.env = {**os.environ, "DATA_DIR": str(data_dir)}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, probe: bool = True) -> RelayProcess:
        self.process = subprocess.Popen(self.args, cwd=ROOT, env=self.env)
        deadline = time.monotonic() + 30
        while probe:  # a relay answers 401 to anything of a replica it does not know
            try:
                if httpx.get(self.url + "/r/0/health", timeout=1).status_code == 401:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and self.process.poll() is None, "the relay did not start"
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        end(self.process)


@contextlib.contextmanager
def gateway_client(deployment: Any, department: str = "Research") -> Iterator[Any]:
    """A fresh gateway on its own port and an openai client with a key of a new department that may
    use ``deployment``."""
    import openai

    from gateway.app import GatewayApp
    from tenancy.models import ApiKey, Department

    owner = Department.objects.create(name=department)
    owner.deployments.add(deployment)
    _, raw = ApiKey.issue(owner, "bot")
    app = GatewayApp()
    server = ServerThread(app, app.close).start()
    try:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=raw, max_retries=0)
    finally:
        server.stop()
