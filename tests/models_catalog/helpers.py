"""Test helpers for the model catalog: a tiny model on disk, a peer console, a throttling proxy and
a fake hub for answers a real hub would not give (HTML pages, hostile file names)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.processes import end

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_safetensors(path: Path, size_bytes: int, seed: int = 0) -> None:
    """A valid safetensors file of about ``size_bytes`` holding one bfloat16 tensor."""
    elements = size_bytes // 2
    header = json.dumps(
        {"model.embed.weight": {"dtype": "BF16", "shape": [elements], "data_offsets": [0, elements * 2]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    block = os.urandom(1024 * 1024) if seed == 0 else bytes([seed % 256]) * (1024 * 1024)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        left = elements * 2
        while left > 0:
            handle.write(block[: min(len(block), left)])
            left -= min(len(block), left)


def make_model_dir(path: Path, weights_bytes: int = 4 * 1024 * 1024) -> Path:
    """A small Llama-shaped model: config, tokenizer files, weights, plus a file the default
    patterns leave out (a pickle)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 2048,
        "vocab_size": 1000,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {"a": 0}}}))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (path / "pytorch_model.bin").write_bytes(b"pickle, not wanted" * 10)
    write_safetensors(path / "model.safetensors", weights_bytes)
    return path


class Peer:
    """Another appliance: a console process with its own database and DATA_DIR, serving /hf/."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "uvicorn.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")},
            "DJANGO_SETTINGS_MODULE": "appliance.settings",
            "VAR_DIR": str(base / "var"),
            "DATA_DIR": str(base / "data"),
            "DATABASE_URL": f"sqlite:///{base / 'peer.sqlite3'}",
            "REDIS_URL": "redis://127.0.0.1:6379/13",
            "NODE_NAME": "peer",
            "DISK_RESERVE_BYTES": "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.process: subprocess.Popen | None = None

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed: {result.stderr}{result.stdout}")
        return result.stdout

    def start(self) -> Peer:
        self.manage("migrate", "--noinput", "-v0")
        self.manage("ensure_admin")
        self.token = self.manage("issue_api_token", "admin", "--name", "client box").strip().splitlines()[-1]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "appliance.asgi:application", "--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/healthz", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the peer console did not start: " + self.log.read_text()[-2000:])

    def requests_since(self, offset: int) -> list[str]:
        """Request lines (method, path, status) the peer logged after byte ``offset`` of its log."""
        text = self.log.read_text()[offset:]
        return [f"{line} {status}" for line, status in re.findall(r'"((?:GET|HEAD) [^ ]+) HTTP/1.1" (\d+)', text)]

    def log_size(self) -> int:
        return len(self.log.read_text())

    def stop(self) -> None:
        end(self.process)


class ThrottledProxy:
    """A TCP proxy that limits the server-to-client rate, counts bytes, and can cut a connection
    after some bytes (a dropped transfer) or refuse everything (the source gone)."""

    def __init__(self, target_port: int, rate_bps: float | None = None) -> None:
        self.target_port = target_port
        self.rate_bps = rate_bps
        self.port = free_port()
        self.bytes_to_client = 0
        self.cut_after: int | None = None
        self.down_after_cut = False
        self.down = False
        self.clients: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to_client: bool) -> None:
        try:
            while data := await reader.read(64 * 1024):
                if to_client:
                    if self.cut_after is not None and self.bytes_to_client + len(data) > self.cut_after:
                        self.cut_after = None
                        writer.transport.abort()
                        if self.down_after_cut:  # the source is gone: every connection drops
                            self.down = True
                            for other in list(self.clients):
                                other.transport.abort()
                        return
                    self.bytes_to_client += len(data)
                    if self.rate_bps:
                        await asyncio.sleep(len(data) / self.rate_bps)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.down:
            client_writer.transport.abort()
            return
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.clients.add(client_writer)
        try:
            await asyncio.gather(
                self._pipe(client_reader, server_writer, False), self._pipe(server_reader, client_writer, True)
            )
        finally:
            self.clients.discard(client_writer)

    def start(self) -> ThrottledProxy:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self.loop
        ).result(5)
        return self

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class FakeHub:
    """A FAKE hub for answers the real one never gives: set ``mode`` to 'html' (a proxy's web page)
    or 'hostile' (a file list with names that try to leave the model directory)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if hub.mode == "html":
                    body = b"<html><body>Welcome to the company proxy</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                else:
                    body = json.dumps(
                        {
                            "id": "evil/model",
                            "sha": "a" * 40,
                            "siblings": [
                                {"rfilename": "config.json", "size": 2, "blobId": "b" * 40},
                                {"rfilename": "../../../escape.json", "size": 2, "blobId": "c" * 40},
                            ],
                        }
                    ).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
