"""The /v1 gateway: a lean ASGI application mounted beside Django (appliance/asgi.py), sharing its
settings and models. Django's request cycle would cost several times the gateway's own work per
request (see bench/gateway.py and the issue's measurements), so requests to /v1 never enter it.

One request: allowlisted path → key (cached, see directory.py) → body size, then the endpoint's
strict schema (admission.parse) → model allowed for the key → the most the request can cost
(admission.plan) reserved by the limiter (one Redis script) → a ready replica (balancer.py, waiting
in the priority queue when the deployment is saturated) → forwarded with the replica's own key, SSE
chunks relayed as they arrive (relay.py) → settlement and the usage record in one pipelined Redis
round trip after the answer went out, spooled when Redis refuses them (accounting.py). A client that
leaves cancels the upstream request; what was generated up to then is billed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import redis.asyncio
from django.conf import settings

from gateway import accounting, admission, relay
from gateway.admission import ENDPOINTS, Shaped
from gateway.balancer import Balancer, QueueFull, QueueTimeout, Ticket
from gateway.directory import Directory, KeyInfo, ReplicaRoute, Route, priority_rank
from gateway.errors import GatewayError
from tenancy.limiter import AsyncLimiter, Decision

log = logging.getLogger(__name__)
VLLM_PRIORITY = {0: -10, 1: 0, 2: 10}  # vLLM: lower runs earlier


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
    ticket: Ticket | None = None
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
        self.balancer = Balancer(self.redis, settings.GATEWAY_REPLICA_CAPACITY, shares=shares,
                                 window=settings.GATEWAY_PRIORITY_WINDOW_SECONDS,
                                 max_queue=settings.GATEWAY_MAX_QUEUE,
                                 tolerance=settings.GATEWAY_PRIORITY_TOLERANCE_PERCENT / 100)  # fmt: skip
        self.spool = accounting.Spool()
        self.spool.adopt()
        self.retrying = asyncio.ensure_future(self.retry_spooled())

    async def retry_spooled(self) -> None:
        """Send spooled settlements once Redis is back, even when no request comes to trigger it."""
        while True:
            await asyncio.sleep(accounting.RETRY_SECONDS)
            if self.spool.items:
                await self.spool.replay(self.redis, self.limiter)

    async def close(self) -> None:
        self.retrying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.retrying
        await self.balancer.close()
        await self.session.close()
        await self.redis.aclose()


def cache_salt(department_id: int) -> str:
    """A department's vLLM ``cache_salt``: prefix-cache hits stay within the department, so no one can
    learn another department's prompts by timing them. Derived from the secret key: stable across
    restarts and console instances, never guessable."""
    return _salt(settings.SECRET_KEY, department_id)


@functools.lru_cache(maxsize=4096)
def _salt(secret: str, department_id: int) -> str:
    digest = hmac.new(secret.encode(), f"cache-salt:{department_id}".encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


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
            try:
                await accounting.account(state, call)
            finally:
                if call.ticket is not None and call.ticket.token in state.balancer.held:  # accounting never got to it
                    await state.balancer.release(call.ticket)

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
        call.shaped = shaped = admission.parse(call.endpoint, body)
        routes = await state.directory.routes()
        route = routes.get(shaped.model)
        if route is None:
            raise GatewayError(404, f"The model '{shaped.model}' does not exist.", "model_not_found", "model")
        if shaped.model not in call.key.models:
            raise GatewayError(403, f"Your key may not use the model '{shaped.model}'.", "model_not_allowed", "model")
        call.route = route
        key = call.key
        reserve = admission.plan(shaped, route, key.max_tokens_cap)
        decision = await state.limiter.admit(key.department_id, key.limits, reserve, settings.GATEWAY_LEASE_SECONDS,
                                             key.pk, key.key_limits)  # fmt: skip
        call.rate_headers = _rate_headers(key.effective, decision)
        if not decision.allowed:
            self.refuse(decision)
        call.decision = decision
        if not route.replicas:
            raise GatewayError(503, f"No replica of '{route.name}' is ready.", "no_replica_ready")

        rank = priority_rank(key.priority)
        salt = cache_salt(key.department_id) if settings.GATEWAY_CACHE_SALT else None
        data = admission.encode(shaped, VLLM_PRIORITY[rank] if route.priority_scheduling else None, salt)
        prefix = shaped.prefix if len(shaped.prefix) >= settings.GATEWAY_AFFINITY_MIN_CHARS else ""
        try:
            call.ticket = await state.balancer.admit(route.deployment_id, route.replicas, rank, prefix,
                                                     settings.GATEWAY_QUEUE_SECONDS)  # fmt: skip
        except QueueTimeout as exc:
            code = "queue_full" if isinstance(exc, QueueFull) else "queue_timeout"
            raise GatewayError(429, f"'{route.name}' is saturated; try again shortly.", code,
                               headers=[(b"retry-after", b"1")]) from None  # fmt: skip
        except (redis.RedisError, OSError):
            raise GatewayError(503, "Queue state is unavailable; the gateway refuses requests until it is back.",
                               "quota_unavailable", headers=[(b"retry-after", b"1")]) from None  # fmt: skip
        # The room is given back with the settlement, in its round trip (accounting.account).
        await relay.forward_watching(state, call, data, receive, send)

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
        await relay.respond(send, call, 200, body, b"application/json")
