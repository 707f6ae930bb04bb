"""A FAKE OpenAI-compatible engine (selected explicitly by the gateway tests and bench/gateway.py,
never by the console): the parts of vLLM's API the gateway forwards to, answered at once or with a
delay per token. It checks the bearer key like vLLM's ``--api-key``, honours
``stream_options.include_usage``/``continuous_usage_stats`` as vLLM does, and keeps the last
requests it got (``GET /_fake/requests``) and how many streams lost their client
(``GET /_fake/stats``) so tests can see what the gateway sent. ``POST /_fake/hold`` keeps every
request that arrives at the engine until ``POST /_fake/release``: a test fills a slot for as long as
it needs, whatever the machine's speed.

    python -m tests.gateway.fake_engine --port 9001 --key secret [--token-delay 0.01] [--tokens 16]
        [--first-delay 0] [--linger 0]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import deque
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _prompt_tokens(body: dict[str, Any]) -> int:
    text = orjson.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")
    return max(1, len(text) // 4)


class FakeEngine:
    def __init__(
        self, key: str, tokens: int = 16, token_delay: float = 0.0, first_delay: float = 0.0, linger: float = 0.0
    ) -> None:
        self.key = f"Bearer {key}".encode()
        self.tokens, self.token_delay, self.first_delay = tokens, token_delay, first_delay
        self.linger = linger  # seconds a stream stays open after its [DONE]
        self.requests: deque[dict[str, Any]] = deque(maxlen=200)
        self.disconnected = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate = asyncio.Event()
        self.gate.set()
        # vLLM's own metric names (v1), exposed with prometheus_client as vLLM does.
        self.registry = CollectorRegistry()
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens.", registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "TTFT.", registry=self.registry,
                              buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0))  # fmt: skip
        running = Gauge("vllm:num_requests_running", "Running.", registry=self.registry)
        running.set_function(lambda: self.in_flight)
        Gauge("vllm:num_requests_waiting", "Waiting.", registry=self.registry).set(0)
        Gauge("vllm:kv_cache_usage_perc", "KV cache use.", registry=self.registry).set_function(
            lambda: min(1.0, self.in_flight / 10)
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)  # unguarded, as vLLM's is: what the relay must hide
        app.router.add_get("/_fake/requests", self.seen)
        app.router.add_get("/_fake/stats", self.stats)
        app.router.add_post("/_fake/reset", self.reset)
        app.router.add_post("/_fake/hold", self.hold)
        app.router.add_post("/_fake/release", self.release)
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize"):
            app.router.add_post(path, self.generate)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def seen(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(list(self.requests)), content_type="application/json")

    async def stats(self, request: web.Request) -> web.Response:
        stats = {"disconnected": self.disconnected, "max_in_flight": self.max_in_flight, "in_flight": self.in_flight}
        return web.Response(body=orjson.dumps(stats), content_type="application/json")

    async def reset(self, request: web.Request) -> web.Response:
        self.requests.clear()
        self.disconnected = self.max_in_flight = 0
        return web.Response()

    async def hold(self, request: web.Request) -> web.Response:
        self.gate.clear()
        return web.Response()

    async def release(self, request: web.Request) -> web.Response:
        self.gate.set()
        return web.Response()

    async def generate(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization", "").encode() != self.key:
            return web.Response(status=401, body=b'{"error": "Unauthorized"}', content_type="application/json")
        body = orjson.loads(await request.read())
        self.requests.append({"path": request.path, "body": body})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            return await self._answer(request, body)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        prompt = _prompt_tokens(body)
        count = min(int(body.get("max_tokens") or self.tokens), self.tokens)
        model = body.get("model", "fake")
        created = int(time.time())
        if self.first_delay:
            await asyncio.sleep(self.first_delay)
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(count)
        self.ttft.observe(self.first_delay + self.token_delay)
        if request.path == "/v1/embeddings":
            data = {"object": "list", "model": model, "usage": _usage(prompt, 0),
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]}  # fmt: skip
            return web.Response(body=orjson.dumps(data), content_type="application/json")
        chat = request.path == "/v1/chat/completions"
        if not body.get("stream"):
            if self.token_delay:
                await asyncio.sleep(self.token_delay * count)
            text = " ".join(["tok"] * count)
            choice = {"index": 0, "finish_reason": "length"} | (
                {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            )
            data = {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": model, "choices": [choice], "usage": _usage(prompt, count)}  # fmt: skip
            return web.Response(body=orjson.dumps(data), content_type="application/json")

        options = body.get("stream_options") or {}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"
        try:
            for i in range(count):
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                delta = {"delta": {"content": "tok "}} if chat else {"text": "tok "}
                finish = None if i < count - 1 else "length"
                chunk = {"id": "cmpl-fake", "object": kind, "created": created, "model": model,
                         "choices": [{"index": 0, **delta, "finish_reason": finish}]}  # fmt: skip
                if options.get("include_usage") and options.get("continuous_usage_stats"):
                    chunk["usage"] = _usage(prompt, i + 1)
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if options.get("include_usage"):
                final = {"id": "cmpl-fake", "object": kind, "created": created, "model": model, "choices": [],
                         "usage": _usage(prompt, count)}  # fmt: skip
                await response.write(b"data: " + orjson.dumps(final) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            if self.linger:
                await asyncio.sleep(self.linger)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected += 1
            raise
        return response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--first-delay", type=float, default=0.0)
    parser.add_argument("--linger", type=float, default=0.0)
    args = parser.parse_args()
    engine = FakeEngine(args.key, args.tokens, args.token_delay, args.first_delay, args.linger)
    web.run_app(engine.app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
