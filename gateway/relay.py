"""Forwarding an admitted request to a replica and relaying its answer: one pooled HTTP client,
each replica's own key, SSE events passed on as they arrive (usage noted from every chunk, hidden
from clients that did not ask for it), another replica tried when one fails before the client got a
byte, and the upstream request cancelled when the client leaves."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from django.conf import settings

from gateway.errors import GatewayError
from provisioning import relay as node_relay

if TYPE_CHECKING:
    from gateway.admission import Shaped
    from gateway.app import Call, State
    from gateway.directory import ReplicaRoute

log = logging.getLogger(__name__)
CLOSE_WAIT_SECONDS = 5.0  # how long an engine may take to close a stream after its [DONE]
# An engine that died or was killed: its connection refused, reset or closed, or its answer cut short
# (a pooled connection it reset, ClientConnectionResetError; a body short of its length,
# ClientPayloadError). A read timeout is a slow engine, not a dead one: it is not retried.
UPSTREAM_FAILED = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


async def respond(send: Any, call: Call, status: int, body: bytes, content_type: bytes) -> None:
    now = time.perf_counter()
    # Time spent here: before the request went upstream, and since the engine's answer arrived.
    call.overhead = (call.upstream_sent - call.started) + (now - call.first_byte) if call.first_byte else (
        now - call.started)  # fmt: skip
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               (b"x-gateway-overhead-ms", f"{call.overhead * 1000:.3f}".encode()), *call.rate_headers]  # fmt: skip
    call.response_started = call.finished = True
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def forward_watching(state: State, call: Call, data: bytes, receive: Any, send: Any) -> None:
    """Forward while watching for the client leaving; if it does, cancel the upstream request."""
    forwarding = asyncio.ensure_future(forward(state, call, data, send))
    watcher = asyncio.ensure_future(receive())
    try:
        while True:
            done, _ = await asyncio.wait({forwarding, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if forwarding in done:
                forwarding.result()
                return
            message = watcher.result()
            if message["type"] == "http.disconnect":
                if call.finished:  # the client has its whole answer: a finished request, not a 499
                    try:
                        await asyncio.wait_for(forwarding, CLOSE_WAIT_SECONDS)
                    except TimeoutError:
                        pass  # an engine slow to close a stream it ended: not the client's doing
                    return
                forwarding.cancel()
                try:
                    await forwarding
                except (asyncio.CancelledError, Exception):  # noqa: S110 - the client is gone either way
                    pass
                call.status, call.error = 499, "client_disconnected"
                return
            watcher = asyncio.ensure_future(receive())  # a stray body message: keep watching
    finally:
        if not watcher.done():
            watcher.cancel()


async def forward(state: State, call: Call, data: bytes, send: Any) -> None:
    shaped, route, ticket = call.shaped, call.route, call.ticket
    assert shaped is not None and route is not None and ticket is not None
    tried: set[int] = set()
    replica: ReplicaRoute | None = ticket.replica
    while replica is not None:
        tried.add(replica.pk)
        call.replica = replica
        try:
            call.upstream_sent = time.perf_counter()
            call.overhead = call.upstream_sent - call.started
            headers = {"Authorization": f"Bearer {replica.key}", "Content-Type": "application/json"}
            async with state.session.post(f"{replica.base_url}/v1/{call.endpoint}", data=data,
                                          headers=headers) as response:  # fmt: skip
                if response.headers.get(node_relay.FAILURE_HEADER):  # another box's relay: its engine is gone
                    raise aiohttp.ServerDisconnectedError(f"relay: {response.headers[node_relay.FAILURE_HEADER]}")
                if shaped.stream and response.status == 200:
                    await relay_stream(call, response, send)
                else:
                    await relay_whole(call, response, send)
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
        prefix = shaped.prefix if len(shaped.prefix) >= settings.GATEWAY_AFFINITY_MIN_CHARS else ""
        replica = await state.balancer.repick(ticket, route.replicas, prefix, tried)
    raise GatewayError(503, f"No replica of '{route.name}' answered.", "no_replica_ready")


def _count(value: Any) -> int:
    """A token count from an engine's usage object (anything else counts as nothing)."""
    return value if type(value) is int and value > 0 else 0


async def relay_whole(call: Call, response: aiohttp.ClientResponse, send: Any) -> None:
    body = await response.read()
    call.first_byte = time.perf_counter()
    status = response.status
    if status == 200:
        try:
            found = orjson.loads(body).get("usage") or {}
            call.prompt_tokens = _count(found.get("prompt_tokens"))
            call.completion_tokens = _count(found.get("completion_tokens"))
        except (orjson.JSONDecodeError, AttributeError):
            pass
    elif status >= 500:
        call.error = "upstream_error"
    else:
        call.error = "upstream_refused"
    call.status = status
    content_type = response.headers.get("Content-Type", "application/json").encode()
    await respond(send, call, status, body, content_type)


async def relay_stream(call: Call, response: aiohttp.ClientResponse, send: Any) -> None:
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
            event = rewrite_event(call, shaped, event)
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


def rewrite_event(call: Call, shaped: Shaped, event: bytes) -> bytes:
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
    if not isinstance(found, dict) or not found:
        return event
    call.prompt_tokens = _count(found.get("prompt_tokens")) or call.prompt_tokens
    call.completion_tokens = _count(found.get("completion_tokens")) or call.completion_tokens
    if not choices:  # the usage-only chunk at the end
        return event if shaped.wants_usage else b""
    if shaped.wants_continuous_usage:
        return event
    del chunk["usage"]
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
