"""After the answer: settle the reservation, record usage and metrics, in one Redis round trip.

Billed ≤ reserved, always: the reservation (admission.plan) is an upper bound of what a request can
consume, and an engine count above it is billed at the reservation and counted in
``gateway_reservation_exceeded_total``.

When Redis refuses the settlement (down, restarting) nothing is lost: the settlement and the usage
entry go to a spool file of this process (``VAR_DIR/spool/``) and are retried, in order, every
``RETRY_SECONDS`` until Redis takes them; the concurrency lease is released by the retried
settlement. A process that died with a spool leaves its file behind; the next gateway to start on
the box adopts it (a rename, so only one does).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio
import redis.exceptions
from django.conf import settings

from gateway import metrics
from tenancy import usage
from tenancy.limiter import AsyncLimiter

if TYPE_CHECKING:
    from gateway.app import Call

log = logging.getLogger(__name__)
RETRY_SECONDS = 1.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spool:
    """Settlements and usage entries Redis did not take, kept on disk until it does."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or Path(settings.VAR_DIR) / "spool"
        self.path = self.directory / f"gateway-{os.getpid()}.jsonl"
        self.items: list[dict[str, Any]] = []
        self.last_try = 0.0
        self.retrying: asyncio.Task | None = None

    def add(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as out:
            out.write(orjson.dumps(item) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        metrics.SPOOLED.inc()

    def adopt(self) -> None:
        """Take over the spool files of gateway processes that are gone."""
        if not self.directory.is_dir():
            return
        for found in sorted(self.directory.glob("gateway-*.jsonl")):
            try:
                pid = int(found.stem.removeprefix("gateway-").split(".")[0])
            except ValueError:
                continue
            if pid == os.getpid() or _alive(pid):
                continue
            claimed = found.with_name(f"{found.name}.{os.getpid()}.adopting")
            try:
                found.rename(claimed)
            except FileNotFoundError:
                continue  # another gateway adopted it first
            for line in claimed.read_bytes().splitlines():
                if line.strip():
                    self.add(orjson.loads(line))
            claimed.unlink()

    def _rewrite(self) -> None:
        if not self.items:
            self.path.unlink(missing_ok=True)
            return
        spare = self.path.with_suffix(".tmp")
        spare.write_bytes(b"".join(orjson.dumps(item) + b"\n" for item in self.items))
        spare.replace(self.path)

    async def replay(self, client: redis.asyncio.Redis, limiter: AsyncLimiter) -> None:
        """Send what is spooled, oldest first; stop at the first failure (Redis still away)."""
        sent = 0
        try:
            for item in self.items:
                try:
                    await send(client, limiter, item.get("settle"), item.get("entry"))
                except EntryOnly:
                    item["entry"] = None  # in: only the settlement is left to send
                    self._rewrite()
                    raise
                sent += 1
        except (redis.RedisError, OSError):
            pass
        finally:
            if sent:
                del self.items[:sent]
                self._rewrite()

    def retry_soon(self, client: redis.asyncio.Redis, limiter: AsyncLimiter) -> None:
        now = time.monotonic()
        if not self.items or (self.retrying and not self.retrying.done()) or now - self.last_try < RETRY_SECONDS:
            return
        self.last_try = now
        self.retrying = asyncio.ensure_future(self.replay(client, limiter))


class EntryOnly(redis.exceptions.RedisError):
    """The usage entry went in, the settlement did not: only the settlement is to be spooled."""


async def send(client: redis.asyncio.Redis, limiter: AsyncLimiter, settle: Any, entry: dict[str, str] | None,
               release: Any = None) -> bool:  # fmt: skip
    """The settlement and the usage entry (and the room given back, ``release(pipe)``) in one round
    trip. A pipeline is not a transaction: when Redis lost the settle script (it restarted) the entry
    is in all the same, so only the settlement is sent again (which loads the script); when the
    settlement fails otherwise, ``EntryOnly`` says that the entry is in. Returns whether the release
    (if any) went through; when not, the caller gives the room back on its own."""
    pipe = client.pipeline(transaction=False)
    if settle is not None:
        limiter.settle_raw_in(pipe, *settle)
    if entry is not None:
        pipe.xadd(usage.STREAM, entry)
    if release is not None:
        release(pipe)
    results = await pipe.execute(raise_on_error=False)
    released = True
    if release is not None:
        released = not isinstance(results.pop(), Exception)
    if entry is not None and isinstance(results[-1], Exception):
        raise results[-1]
    if settle is not None and isinstance(results[0], Exception):
        try:
            if not isinstance(results[0], redis.exceptions.NoScriptError):
                raise results[0]
            await limiter.settle_raw(*settle)
        except (redis.RedisError, OSError) as exc:
            if entry is None:
                raise
            raise EntryOnly(str(exc)) from exc
    return released


async def account(state: Any, call: Call) -> None:
    """Settle the reservation, record usage and metrics (one Redis round trip)."""
    if not call.endpoint:
        return
    key, shaped, route = call.key, call.shaped, call.route
    now = time.perf_counter()
    if key is None or shaped is None:
        if key is not None and call.endpoint == "models" and call.status == 200:
            # Listing models bills nothing and names no model: metrics only, no usage record.
            metrics.observe(key.department, "-", 200, 0, 0, None, now - call.started, call.overhead)
        else:  # no key, an unknown key, a malformed request: a bounded count, not a usage row
            metrics.REFUSED.labels(call.error or "internal_error").inc()
        return
    if call.status == 499 or (call.chunks and not call.completion_tokens):
        # Left mid-stream, or an engine that sends no usage: bill what reached the client.
        call.completion_tokens = call.completion_tokens or call.chunks
    if not call.prompt_tokens and call.upstream_sent and call.status in (200, 499):
        call.prompt_tokens = min(shaped.prompt_chars // 4 + 1, shaped.reserve)  # no usage came back: an estimate
    decision = call.decision
    if decision is not None and call.prompt_tokens + call.completion_tokens > decision.reserved:
        metrics.EXCEEDED.inc()
        log.warning("an answer of %s passed its reservation (%s > %s tokens); billed the reservation", route.name
                    if route else "-", call.prompt_tokens + call.completion_tokens, decision.reserved)  # fmt: skip
        call.prompt_tokens = min(call.prompt_tokens, decision.reserved)
        call.completion_tokens = decision.reserved - call.prompt_tokens
    used = call.prompt_tokens + call.completion_tokens
    fields = usage.entry(
        department_id=key.department_id, key_id=key.pk, deployment_id=route.deployment_id if route else None,
        model=shaped.model, endpoint=call.endpoint, prompt_tokens=call.prompt_tokens,
        completion_tokens=call.completion_tokens, latency_ms=(now - call.started) * 1000,
        ttft_ms=(call.first_byte - call.started) * 1000 if call.first_byte else None,
        status=call.status or 500, error=call.error, client=call.client,
    )  # fmt: skip
    settle = state.limiter.settle_call(key.department_id, key.limits, decision, used) if decision else None
    spool: Spool = state.spool
    ticket = call.ticket
    # What the engine took to start streaming (queueing in the gateway left out) teaches admission; a
    # whole answer's time says more of its length than of the engine's load.
    answered = call.status == 200 and call.first_byte and shaped.stream
    engine_ttft = call.first_byte - call.upstream_sent if answered else None
    target = route.ttft_target if route else None
    release = (lambda pipe: state.balancer.release_in(pipe, ticket, engine_ttft, target)) if ticket else None
    try:
        if spool.items:
            raise redis.exceptions.ConnectionError("earlier settlements still spooled")  # keep them in order
        if not await send(state.redis, state.limiter, settle, fields, release):
            await state.balancer.release(ticket, engine_ttft, target)  # e.g. Redis lost the script: alone
    except (redis.RedisError, OSError) as exc:
        log.warning("Redis refused a settlement (%s); spooled for retry (department %s)", type(exc).__name__,
                    key.department)  # fmt: skip
        spool.add({"settle": settle, "entry": None if isinstance(exc, EntryOnly) else fields})
        if ticket is not None:
            await state.balancer.release(ticket)  # again, alone (harmless if it went; Redis down: its lease ends)
    spool.retry_soon(state.redis, state.limiter)
    metrics.observe(key.department, route.name if route else "-", call.status or 500, call.prompt_tokens,
                    call.completion_tokens, call.first_byte - call.started if call.first_byte else None,
                    now - call.started, call.overhead)  # fmt: skip
