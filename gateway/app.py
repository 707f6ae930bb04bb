"""The /v1 gateway: a lean ASGI application mounted beside Django (appliance/asgi.py), sharing its
settings and models. Django's request cycle would cost several times the gateway's own work per
request (see bench/gateway.py and the issue's measurements), so requests to /v1 never enter it.

One request: allowlisted path → key (cached, see directory.py) → body size and fields (sanitize.py)
→ model allowed for the key → limiter (one Redis script) → a ready replica (balancer.py, waiting in
the priority queue when the deployment is saturated) → forwarded with the replica's own key over one
pooled HTTP client, SSE chunks relayed as they arrive → settlement and the usage record in one
pipelined Redis round trip after the answer went out. A client that leaves cancels the upstream
request; what was generated up to then is billed (usage is asked for in every chunk).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import redis.asyncio
import redis.exceptions
from django.conf import settings

from gateway import metrics
from gateway.balancer import Balancer, QueueTimeout
from gateway.directory import Directory, KeyInfo, ReplicaRoute, Route, priority_rank
from gateway.errors import GatewayError
from gateway.sanitize import ENDPOINTS, Shaped, shape
from tenancy import usage
from tenancy.limiter import AsyncLimiter, Decision

log = logging.getLogger(__name__)
VLLM_PRIORITY = {0: -10, 1: 0, 2: 10}  # vLLM: lower runs earlier
CLOSE_WAIT_SECONDS = 5.0  # how long an engine may take to close a stream after its [DONE]
# An engine that died or was killed: its connection refused, reset or closed, or its answer cut short
# (a pooled connection it reset, ClientConnectionResetError; a body short of its length,
# ClientPayloadError). A read timeout is a slow engine, not a dead one: it is not retried.
UPSTREAM_FAILED = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


@dataclass
class Call:
    """What one request carries through the gateway, and what gets billed and recorded."""

    started: float
    endpoint: str = ""
    client: str = ""
    key: KeyInfo | None = None
    shaped: Shaped | None = None
    route: Route | None = None
    decision: Decision | None = None
    replica: ReplicaRoute | None = None
    status: int = 0
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0
    upstream_sent: float = 0.0
    first_byte: float | None = None
    overhead: float = 0.0
    response_started: bool = False
    finished: bool = False
    rate_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class State:
    """Per-event-loop resources, made on the first request (Django's handler has no lifespan)."""

    def __init__(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=settings.GATEWAY_UPSTREAM_TIMEOUT_SECONDS),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        self.redis = redis.asyncio.Redis.from_url(
            settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2, max_connections=512
        )
        self.limiter = AsyncLimiter(self.redis)
        self.directory = Directory()
        shares = (1.0, settings.GATEWAY_NORMAL_SHARE_PERCENT / 100, settings.GATEWAY_LOW_SHARE_PERCENT / 100)
        self.balancer = Balancer(settings.GATEWAY_REPLICA_CAPACITY, shares=shares,
                                 window=settings.GATEWAY_PRIORITY_WINDOW_SECONDS)  # fmt: skip

    async def close(self) -> None:
        await self.session.close()
        await self.redis.aclose()


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _rate_headers(limits: Any, decision: Decision) -> list[tuple[bytes, bytes]]:
    headers = []
    if limits.rpm:
        headers.append((b"x-ratelimit-limit-requests", str(limits.rpm).encode()))
    if limits.tpm:
        headers.append((b"x-ratelimit-limit-tokens", str(limits.tpm).encode()))
    for name, value in decision.remaining.items():
        if name in ("requests", "tokens"):
            headers.append((f"x-ratelimit-remaining-{name}".encode(), str(value).encode()))
    if decision.retry_after is not None:
        headers.append((b"x-ratelimit-reset-requests", f"{decision.retry_after:.3f}s".encode()))
    return headers


class GatewayApp:
    def __init__(self) -> None:
        self._states: dict[int, State] = {}

    def state(self) -> State:
        loop = asyncio.get_running_loop()
        state = self._states.get(id(loop))
        if state is None:
            state = self._states[id(loop)] = State()
        return state

    async def close(self) -> None:
        for state in self._states.values():
            await state.close()
        self._states.clear()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        call = Call(started=time.perf_counter())
        client = scope.get("client")
        call.client = client[0] if client else ""
        state = self.state()
        try:
            await self.handle(state, call, scope, receive, send)
        except GatewayError as error:
            call.status, call.error = error.status, error.code
            if not call.response_started:
                await self.send_error(send, error, call)
        except Exception:
            department = call.key.department if call.key else "-"
            log.exception("gateway request failed (department %s, model %s)", department, call.endpoint)
            call.status, call.error = 500, "internal_error"
            if not call.response_started:
                await self.send_error(send, GatewayError(500, "The gateway failed; see the console's log.",
                                                         "internal_error"), call)  # fmt: skip
        finally:
            await self.account(state, call)

    async def send_error(self, send: Any, error: GatewayError, call: Call) -> None:
        body = error.body()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *call.rate_headers, *error.headers]  # fmt: skip
        call.response_started = True
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- the request ---------------------------------------------------------------------------
    async def handle(self, state: State, call: Call, scope: dict, receive: Any, send: Any) -> None:
        path, method = scope["path"].rstrip("/"), scope["method"]
        header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
        if header_bytes > settings.GATEWAY_MAX_HEADER_BYTES:
            raise GatewayError(431, "Request headers are too large.", "headers_too_large")
        models_listing = path == "/v1/models" or path.startswith("/v1/models/")
        call.endpoint = ENDPOINTS.get(path, "models" if models_listing else "")
        if not call.endpoint:
            raise GatewayError(404, f"Unknown endpoint {path}.", "unknown_url")
        if method != ("GET" if models_listing else "POST"):
            raise GatewayError(405, f"{method} is not allowed on {path}.", "method_not_allowed")
        call.key = await self.authenticate(state, scope)
        if models_listing:
            await self.list_models(state, call, path, send)
            return

        body = await self.read_body(scope, receive)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise GatewayError(400, "The request body is not valid JSON.", "invalid_json") from None
        call.shaped = shaped = shape(call.endpoint, payload, call.key.max_tokens_cap, settings.GATEWAY_MAX_N)
        routes = await state.directory.routes()
        route = routes.get(shaped.model)
        if route is None:
            raise GatewayError(404, f"The model '{shaped.model}' does not exist.", "model_not_found", "model")
        if shaped.model not in call.key.models:
            raise GatewayError(403, f"Your key may not use the model '{shaped.model}'.", "model_not_allowed", "model")
        call.route = route

        reserve = shaped.prompt_chars // 3 + 8
        if call.endpoint != "embeddings":
            reserve += shaped.max_tokens or settings.GATEWAY_DEFAULT_MAX_TOKENS
        key = call.key
        decision = await state.limiter.admit(key.department_id, key.limits, reserve, settings.GATEWAY_LEASE_SECONDS,
                                             key.pk, key.key_limits)  # fmt: skip
        call.rate_headers = _rate_headers(key.effective, decision)
        if not decision.allowed:
            self.refuse(decision)
        call.decision = decision
        if not route.replicas:
            raise GatewayError(503, f"No replica of '{route.name}' is ready.", "no_replica_ready")

        rank = priority_rank(key.priority)
        if route.priority_scheduling:
            shaped.body["priority"] = VLLM_PRIORITY[rank]
        gate = state.balancer.gate(route.deployment_id, len(route.replicas))
        try:
            await gate.acquire(rank, settings.GATEWAY_QUEUE_SECONDS)
        except QueueTimeout:
            raise GatewayError(429, f"'{route.name}' is saturated; try again shortly.", "queue_timeout",
                               headers=[(b"retry-after", b"1")]) from None  # fmt: skip
        try:
            await self.forward_watching(state, call, receive, send)
        finally:
            gate.release()

    def refuse(self, decision: Decision) -> None:
        if decision.limit == "redis_unavailable":
            raise GatewayError(503, "Quota state is unavailable; the gateway refuses requests until it is back.",
                               "quota_unavailable", headers=[(b"retry-after", b"1")])  # fmt: skip
        if decision.limit == "tpm_request_too_large":
            raise GatewayError(400, "This request asks for more tokens than your department's tokens-per-minute "
                               "limit; lower max_tokens.", "request_too_large", "max_tokens")  # fmt: skip
        retry = str(max(1, math.ceil(decision.retry_after or 1))).encode()
        raise GatewayError(429, f"Rate limit reached ({decision.limit}).", f"rate_limit_{decision.limit}",
                           headers=[(b"retry-after", retry)])  # fmt: skip

    async def authenticate(self, state: State, scope: dict) -> KeyInfo:
        header = _header(scope, b"authorization")
        if not header or not header[:7].lower() == b"bearer ":
            raise GatewayError(401, "Missing API key: send 'Authorization: Bearer <key>'.", "missing_api_key")
        raw = header[7:].strip().decode("latin-1")
        key = await state.directory.key(raw)
        if key is None:
            raise GatewayError(401, "Invalid API key.", "invalid_api_key")
        if not key.usable(time.time()):
            raise GatewayError(401, "This API key is revoked or expired.", "invalid_api_key")
        return key

    async def read_body(self, scope: dict, receive: Any) -> bytes:
        limit = settings.GATEWAY_MAX_BODY_BYTES
        declared = _header(scope, b"content-length")
        too_large = GatewayError(413, f"The request body is over {limit} bytes.", "request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise GatewayError(499, "The client went away.", "client_disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            parts.append(chunk)
            if not message.get("more_body"):
                return b"".join(parts)

    async def list_models(self, state: State, call: Call, path: str, send: Any) -> None:
        routes = await state.directory.routes()
        allowed = sorted(name for name in call.key.models if name in routes)
        cards = [{"id": name, "object": "model", "created": routes[name].created, "owned_by": "appliance"}
                 for name in allowed]  # fmt: skip
        if path.startswith("/v1/models/"):
            wanted = path.removeprefix("/v1/models/")
            found = [card for card in cards if card["id"] == wanted]
            if not found:
                raise GatewayError(404, f"The model '{wanted}' does not exist.", "model_not_found", "model")
            body = orjson.dumps(found[0])
        else:
            body = orjson.dumps({"object": "list", "data": cards})
        call.status = 200
        await self.respond(send, call, 200, body, b"application/json")

    async def respond(self, send: Any, call: Call, status: int, body: bytes, content_type: bytes) -> None:
        now = time.perf_counter()
        # Time spent here: before the request went upstream, and since the engine's answer arrived.
        call.overhead = (call.upstream_sent - call.started) + (now - call.first_byte) if call.first_byte else (
            now - call.started)  # fmt: skip
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                   (b"x-gateway-overhead-ms", f"{call.overhead * 1000:.3f}".encode()), *call.rate_headers]  # fmt: skip
        call.response_started = call.finished = True
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- forwarding ----------------------------------------------------------------------------
    async def forward_watching(self, state: State, call: Call, receive: Any, send: Any) -> None:
        """Forward while watching for the client leaving; if it does, cancel the upstream request."""
        forward = asyncio.ensure_future(self.forward(state, call, send))
        watcher = asyncio.ensure_future(receive())
        try:
            while True:
                done, _ = await asyncio.wait({forward, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if forward in done:
                    forward.result()
                    return
                message = watcher.result()
                if message["type"] == "http.disconnect":
                    if call.finished:  # the client has its whole answer: a finished request, not a 499
                        try:
                            await asyncio.wait_for(forward, CLOSE_WAIT_SECONDS)
                        except TimeoutError:
                            pass  # an engine slow to close a stream it ended: not the client's doing
                        return
                    forward.cancel()
                    try:
                        await forward
                    except (asyncio.CancelledError, Exception):  # noqa: S110 - the client is gone either way
                        pass
                    call.status, call.error = 499, "client_disconnected"
                    return
                watcher = asyncio.ensure_future(receive())  # a stray body message: keep watching
        finally:
            if not watcher.done():
                watcher.cancel()

    async def forward(self, state: State, call: Call, send: Any) -> None:
        shaped, route = call.shaped, call.route
        assert shaped is not None and route is not None
        data = orjson.dumps(shaped.body)
        tried: set[int] = set()
        prefix = shaped.prefix if len(shaped.prefix) >= settings.GATEWAY_AFFINITY_MIN_CHARS else ""
        while True:
            replica = state.balancer.pick(route.replicas, prefix, tried)
            if replica is None:
                raise GatewayError(503, f"No replica of '{route.name}' answered.", "no_replica_ready")
            tried.add(replica.pk)
            call.replica = replica
            state.balancer.outstanding[replica.pk] += 1
            try:
                call.upstream_sent = time.perf_counter()
                call.overhead = call.upstream_sent - call.started
                headers = {"Authorization": f"Bearer {replica.key}", "Content-Type": "application/json"}
                async with state.session.post(f"{replica.base_url}/v1/{call.endpoint}", data=data,
                                              headers=headers) as response:  # fmt: skip
                    if shaped.stream and response.status == 200:
                        await self.relay_stream(call, response, send)
                    else:
                        await self.relay_whole(call, response, send)
                return
            except aiohttp.SocketTimeoutError as exc:
                raise GatewayError(504, "The engine did not answer in time.", "upstream_timeout") from exc
            except UPSTREAM_FAILED as exc:
                if call.finished:  # the engine went away after its [DONE]: the client has the whole answer
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                if call.response_started:
                    raise GatewayError(502, "The engine closed the connection mid-answer.", "upstream_failed") from exc
                log.warning("replica %s failed (%s); trying another", replica.pk, type(exc).__name__)
                state.balancer.mark_down(replica.pk)
                call.first_byte, call.chunks, call.prompt_tokens, call.completion_tokens = None, 0, 0, 0
            finally:
                state.balancer.outstanding[replica.pk] -= 1

    async def relay_whole(self, call: Call, response: aiohttp.ClientResponse, send: Any) -> None:
        body = await response.read()
        call.first_byte = time.perf_counter()
        status = response.status
        if status == 200:
            try:
                found = orjson.loads(body).get("usage") or {}
                call.prompt_tokens = int(found.get("prompt_tokens") or 0)
                call.completion_tokens = int(found.get("completion_tokens") or 0)
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                pass
        elif status >= 500:
            call.error = "upstream_error"
        else:
            call.error = "upstream_refused"
        call.status = status
        content_type = response.headers.get("Content-Type", "application/json").encode()
        await self.respond(send, call, status, body, content_type)

    async def relay_stream(self, call: Call, response: aiohttp.ClientResponse, send: Any) -> None:
        shaped = call.shaped
        assert shaped is not None
        call.status = 200
        buffer = b""
        async for data in response.content.iter_any():
            if call.first_byte is None:
                call.first_byte = time.perf_counter()
            buffer += data
            out = []
            while True:
                end = buffer.find(b"\n\n")
                if end < 0:
                    break
                event, buffer = buffer[: end + 2], buffer[end + 2 :]
                event = self.rewrite_event(call, shaped, event)
                if event:
                    out.append(event)
            if not out:
                continue
            if not call.response_started:
                call.overhead += time.perf_counter() - call.first_byte
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"), (b"x-gateway-overhead-ms", f"{call.overhead * 1000:.3f}".encode()),
                    *call.rate_headers]})  # fmt: skip
                call.response_started = True
            await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            if out[-1].startswith(b"data: [DONE]"):
                call.finished = True  # clients close as soon as they read it; what the engine sends after is nothing
        call.finished = True
        if not call.response_started:
            call.response_started = True
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})  # fmt: skip
        await send({"type": "http.response.body", "body": buffer, "more_body": False})

    def rewrite_event(self, call: Call, shaped: Shaped, event: bytes) -> bytes:
        """Note the usage a chunk carries; hide what the client did not ask for."""
        if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
            return event
        try:
            chunk = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return event
        if not isinstance(chunk, dict):
            return event
        found = chunk.get("usage")
        choices = chunk.get("choices")
        if choices:
            call.chunks += 1
        if not found:
            return event
        call.prompt_tokens = int(found.get("prompt_tokens") or call.prompt_tokens)
        call.completion_tokens = int(found.get("completion_tokens") or call.completion_tokens)
        if not choices:  # the usage-only chunk at the end
            return event if shaped.wants_usage else b""
        if shaped.wants_continuous_usage:
            return event
        del chunk["usage"]
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    # -- after the answer ----------------------------------------------------------------------
    async def account(self, state: State, call: Call) -> None:
        """Settle the reservation, record usage and metrics (one Redis round trip)."""
        if not call.endpoint:
            return
        if call.endpoint == "models" and call.status == 200:
            # Listing models bills nothing and names no model: metrics only, no usage record.
            if call.key is not None:
                metrics.observe(call.key.department, "-", 200, 0, 0, None, time.perf_counter() - call.started,
                                call.overhead)  # fmt: skip
            return
        now = time.perf_counter()
        key, shaped = call.key, call.shaped
        if call.status == 499 or (call.chunks and not call.completion_tokens):
            # Left mid-stream, or an engine that sends no usage: bill what reached the client.
            call.completion_tokens = call.completion_tokens or call.chunks
        if not call.prompt_tokens and shaped is not None and call.upstream_sent and call.status in (200, 499):
            call.prompt_tokens = shaped.prompt_chars // 4 + 1  # no usage came back: an estimate
        used = call.prompt_tokens + call.completion_tokens
        model = shaped.model if shaped is not None else ""
        try:
            pipe = state.redis.pipeline(transaction=False)
            if call.decision is not None and key is not None:
                state.limiter.settle_in(pipe, key.department_id, key.limits, call.decision, used)
            fields = usage.entry(
                department_id=key.department_id if key else None, key_id=key.pk if key else None,
                deployment_id=call.route.deployment_id if call.route else None, model=model,
                endpoint=call.endpoint, prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens,
                latency_ms=(now - call.started) * 1000,
                ttft_ms=(call.first_byte - call.started) * 1000 if call.first_byte else None,
                status=call.status or 500, error=call.error, client=call.client,
            )  # fmt: skip
            pipe.xadd(usage.STREAM, fields, maxlen=usage.STREAM_MAXLEN, approximate=True)
            try:
                await pipe.execute()
            except redis.exceptions.NoScriptError:  # Redis restarted since the script was loaded
                await state.limiter.settle(key.department_id, key.limits, call.decision, used)
        except (redis.RedisError, OSError):
            log.exception("could not settle or record a request (department %s)", key.department if key else "-")
        if key is not None:
            metrics.observe(key.department, model or "-", call.status or 500, call.prompt_tokens,
                            call.completion_tokens, call.first_byte - call.started if call.first_byte else None,
                            now - call.started, call.overhead)  # fmt: skip
