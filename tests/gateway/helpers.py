"""Running the gateway and the FAKE engine for tests: a real uvicorn server in a thread of the test
process (so it reads the test database), and fake_engine.py in a subprocess."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from tests.models_catalog.helpers import free_port

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

    def __init__(self, key: str = "replica-secret", **options: Any) -> None:
        self.key, self.port = key, free_port()
        self.args = [sys.executable, "-m", "tests.gateway.fake_engine", "--port", str(self.port), "--key", key]
        for name, value in options.items():
            self.args += [f"--{name.replace('_', '-')}", str(value)]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeEngineProcess:
        self.process = subprocess.Popen(self.args, cwd=ROOT)
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and self.process.poll() is None, "the fake engine did not start"
            time.sleep(0.05)

    def seen(self) -> list[dict]:
        return httpx.get(self.url + "/_fake/requests", timeout=5).json()

    def stats(self) -> dict:
        return httpx.get(self.url + "/_fake/stats", timeout=5).json()

    def reset(self) -> None:
        httpx.post(self.url + "/_fake/reset", timeout=5)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
