"""Room on a deployment and the choice of its replica, shared by every gateway process through Redis.

Several web workers, or several console instances behind a load balancer, admit exactly what one
would: the requests in flight on a deployment and on each replica, the queue of waiting requests and
when each priority class was last seen all live in Redis, changed by one script per step (admit,
another replica after a failure, release), so no two processes can both take the last room.

- **Room.** At most ``capacity`` requests of a deployment in flight (its ready replicas times
  ``GATEWAY_REPLICA_CAPACITY``). While a higher class has sent a request in the last ``window``
  seconds, a lower class may hold only its share of it (``GATEWAY_NORMAL_SHARE_PERCENT``,
  ``GATEWAY_LOW_SHARE_PERCENT``); with no higher class around any class may use everything.
- **Safe concurrency.** What the engine does with a request decides what the share alone cannot:
  on an engine whose step time grows with its batch, a lower class that fills its share still slows
  every higher request. So each deployment learns how many requests in flight keep the higher
  classes' time to first token where it was (``safe``, in Redis, learned from every answered
  request of a class with a lower class beneath it): an answer that took longer than the
  deployment's target (or, with none, than ``tolerance`` times the learned typical time) lowers
  ``safe`` at once (×``DECREASE``); one in time raises it slowly, and only while the limit was what
  held the lower classes back, so a calm hour never teaches room that was never tried. The typical
  time is learned only while no request waits. While a higher class is active, a lower class is
  admitted only below both its share and ``safe``; the higher classes are never held by it.
- **Queue.** A request that finds no room waits in the deployment's queue, ordered by class (high
  first) then arrival, for at most the queue timeout; then the caller answers 429. One that finds
  ``max_queue`` (per replica) of its class or better waiting already is refused at once. Whoever frees
  room (a release, or a grant that left room) publishes the head waiter's token; the process that
  owns it tries again at once. Every waiter also retries every ``poll`` seconds (a lost message, a
  window that ran out) and renews its place; a waiter not renewed for ``wait_ttl`` (its process
  died) leaves the queue.
- **Leases.** Room held is a lease of ``lease`` seconds, renewed by the holding process while the
  request runs: a process that dies gives its room back within that time.
- **Replica.** Least requests in flight (counted in Redis over all processes), with prefix affinity:
  requests that share the start of their prompt prefer the same replica (rendezvous hashing) so
  vLLM's prefix cache is reused, unless it is busier than the least busy one by more than ``slack``.
  A replica whose connection just failed is avoided by this process for a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from gateway.directory import ReplicaRoute

log = logging.getLogger(__name__)
WAKE_CHANNEL = "gw:gate:wake"  # also named in the scripts


class QueueTimeout(Exception):
    pass


class QueueFull(QueueTimeout):
    """As many requests of this class or better wait already as the queue holds: refused at once
    (they would time out; waiting, they would only cost every process their polling)."""


# Shared by the scripts: now (ms, Redis clock) and the replica choice among KEYS[first..].
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function pick(first, token, lease, preferred, slack)
  local best, best_n, counts = 0, math.huge, {}
  for i = first, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local n = redis.call('ZCARD', KEYS[i])
    counts[i] = n
    if n < best_n then best, best_n = i, n end
  end
  local chosen = best
  if preferred > 0 and counts[first + preferred - 1] <= best_n + slack then chosen = first + preferred - 1 end
  redis.call('ZADD', KEYS[chosen], now + lease, token)
  redis.call('PEXPIRE', KEYS[chosen], lease * 2)
  return chosen - first + 1
end
local function wake(held, wait, capacity)
  if redis.call('ZCARD', held) < capacity then
    local head = redis.call('ZRANGE', wait, 0, 0)
    if head[1] then redis.call('PUBLISH', 'gw:gate:wake', head[1]) end
  end
end
"""

# KEYS: held, wait, wait-expiry, seen, sequence, control, replica 1..n
# ARGV: token, rank, capacity, limit while a higher class is active, window ms, lease ms, wait ttl ms,
#       preferred replica (1-based, 0: none), slack, most waiting of this class and better (0: no cap)
# Returns the chosen replica (1-based) when admitted, 0 when the request waits (it is then queued), -1
# when the queue ahead of it is full (it is not queued).
ADMIT = (
    _COMMON
    + """
local token, rank = ARGV[1], tonumber(ARGV[2])
local capacity, lower = tonumber(ARGV[3]), tonumber(ARGV[4])
local window, lease, wttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[2], gone)
  redis.call('ZREM', KEYS[3], gone)
end
redis.call('HSET', KEYS[4], rank, now)
redis.call('PEXPIRE', KEYS[4], window + 60000)
local limit = capacity
for r = 0, rank - 1 do
  local seen = redis.call('HGET', KEYS[4], r)
  if seen and now - tonumber(seen) < window then
    local safe = tonumber(redis.call('HGET', KEYS[6], 'safe') or capacity)
    limit = math.max(1, math.min(lower, math.floor(safe)))
    break
  end
end
local score = redis.call('ZSCORE', KEYS[2], token)
local ahead
if score then
  ahead = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. score)
else
  ahead = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. string.format('%d', (rank + 1) * 1e15))
end
if ahead == 0 and redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + lease, token)
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  if score then
    redis.call('ZREM', KEYS[2], token)
    redis.call('ZREM', KEYS[3], token)
  end
  wake(KEYS[1], KEYS[2], capacity)
  return pick(7, token, lease, tonumber(ARGV[8]), tonumber(ARGV[9]))
end
if not score then
  local most = tonumber(ARGV[10])
  if most > 0 and ahead >= most then return -1 end
  local n = redis.call('INCR', KEYS[5])
  redis.call('PEXPIRE', KEYS[5], 86400000)
  redis.call('ZADD', KEYS[2], string.format('%d', rank * 1e15 + n), token)
end
redis.call('ZADD', KEYS[3], now + wttl, token)
redis.call('PEXPIRE', KEYS[2], wttl * 2)
redis.call('PEXPIRE', KEYS[3], wttl * 2)
return 0
"""
)

# KEYS: the replica tried, then the candidates. ARGV: token, lease ms, preferred (1-based or 0), slack.
REPICK = (
    _COMMON
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
return pick(2, ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
"""
)

# KEYS: held, replica, wait, wait-expiry, control. ARGV: token, capacity, and for an answered request of
# a class with a lower class beneath it: its engine time to first token (ms), the target (ms,
# 0: none), tolerance. Also a request that gave up waiting.
RELEASE = (
    _COMMON
    + """
local capacity = tonumber(ARGV[2])
local held_before = redis.call('ZCARD', KEYS[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
local ttft = tonumber(ARGV[3] or '-1')
if ttft >= 0 then
  local safe = tonumber(redis.call('HGET', KEYS[5], 'safe') or capacity)
  local typical = tonumber(redis.call('HGET', KEYS[5], 'typical') or ttft)
  local target, tolerance = tonumber(ARGV[4]), tonumber(ARGV[5])
  local bound = target > 0 and target or typical * tolerance
  if ttft > bound then
    safe = math.max(1, safe * DECREASE)
  elseif held_before >= math.floor(safe) - 1 then
    safe = math.min(capacity, safe + INCREASE / math.max(1, safe))
  end
  -- The typical time: a median followed slowly (frugal streaming), and only while nobody waits, so
  -- it is the unloaded time and a burst teaches it nothing.
  if redis.call('ZCARD', KEYS[3]) == 0 then
    if ttft > typical then typical = typical * (1 + LEARN) else typical = typical * (1 - LEARN) end
  end
  redis.call('HSET', KEYS[5], 'safe', safe, 'typical', typical)
  redis.call('PEXPIRE', KEYS[5], 86400000)
end
wake(KEYS[1], KEYS[3], capacity)
return 1
"""
)

# KEYS: held, replica. ARGV: token, lease ms. Only room still held is renewed.
RENEW = (
    _COMMON
    + """
local lease = tonumber(ARGV[2])
for i = 1, 2 do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + lease, ARGV[1]) == 1 then
    redis.call('PEXPIRE', KEYS[i], lease * 2)
  end
end
return 1
"""
)


# The safe concurrency's steps: down at once by a fifth on a late answer, up by INCREASE per ``safe``
# answers in time; the typical time follows the median by LEARN per answer.
DECREASE, INCREASE, LEARN = 0.8, 1.0, 0.02
RELEASE = RELEASE.replace("DECREASE", str(DECREASE)).replace("INCREASE", str(INCREASE)).replace("LEARN", str(LEARN))


def _keys(deployment_id: int) -> list[str]:
    tag = f"{{gate:{deployment_id}}}"  # one hash tag: a deployment's keys live on one Redis node
    return [f"{tag}:held", f"{tag}:wait", f"{tag}:wexp", f"{tag}:seen", f"{tag}:seq", f"{tag}:ctl"]


def replica_key(deployment_id: int, replica_id: int) -> str:
    return f"{{gate:{deployment_id}}}:rep:{replica_id}"


@dataclass
class Ticket:
    """Room held for one request, and the replica it goes to."""

    deployment_id: int
    token: str
    capacity: int
    replica: ReplicaRoute
    rank: int = 0


class Balancer:
    def __init__(
        self, client: redis.asyncio.Redis, capacity_per_replica: int, slack: int = 4,
        shares: tuple[float, ...] = (1.0, 1.0, 1.0), window: float = 10.0, lease: float = 30.0,
        poll: float = 0.5, wait_ttl: float = 3.0, tolerance: float = 1.2, max_queue: int = 0,
    ) -> None:  # fmt: skip
        self.client = client
        self.capacity_per_replica, self.slack = capacity_per_replica, slack
        self.shares, self.window = shares, window
        self.lease, self.poll, self.wait_ttl = lease, poll, wait_ttl
        self.tolerance, self.max_queue = tolerance, max_queue  # max_queue: per replica, 0: no cap
        self.down_until: dict[int, float] = {}
        self.held: dict[str, Ticket] = {}
        self.waiting: dict[str, asyncio.Future] = {}
        self.admit_script = client.register_script(ADMIT)
        self.repick_script = client.register_script(REPICK)
        self.release_script = client.register_script(RELEASE)
        self.renew_script = client.register_script(RENEW)
        self.tasks = [asyncio.ensure_future(self._listen()), asyncio.ensure_future(self._renew())]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- choosing ------------------------------------------------------------------------------
    def usable(self, replicas: tuple[ReplicaRoute, ...], exclude: set[int]) -> list[ReplicaRoute]:
        now = time.monotonic()
        usable = [r for r in replicas if r.pk not in exclude and self.down_until.get(r.pk, 0) <= now]
        return usable or [r for r in replicas if r.pk not in exclude]  # all marked down: try anyway

    @staticmethod
    def preferred(usable: list[ReplicaRoute], prefix: str) -> int:
        """The replica (1-based) this prompt prefix prefers, 0 for none."""
        if len(usable) < 2 or not prefix:
            return 0
        digest = prefix.encode()
        scores = [hashlib.blake2b(digest + r.pk.to_bytes(8, "big"), digest_size=8).digest() for r in usable]
        return scores.index(max(scores)) + 1

    def mark_down(self, replica_id: int, seconds: float = 5.0) -> None:
        self.down_until[replica_id] = time.monotonic() + seconds

    def limit(self, capacity: int, rank: int) -> int:
        """Room a class may hold while a higher class is active."""
        return max(1, int(capacity * self.shares[rank]))

    # -- room ----------------------------------------------------------------------------------
    async def admit(
        self, deployment_id: int, replicas: tuple[ReplicaRoute, ...], rank: int, prefix: str, timeout: float
    ) -> Ticket:
        """Room for one request and its replica, waiting in the queue for at most ``timeout``."""
        capacity = max(1, len(replicas) * self.capacity_per_replica)
        token = secrets.token_hex(12)
        deadline = time.monotonic() + timeout
        ms = lambda seconds: str(int(seconds * 1000))  # noqa: E731
        try:
            while True:
                usable = self.usable(replicas, set())
                woken = self.waiting[token] = asyncio.get_running_loop().create_future()
                keys = [*_keys(deployment_id), *(replica_key(deployment_id, r.pk) for r in usable)]
                args = [token, rank, capacity, self.limit(capacity, rank), ms(self.window), ms(self.lease),
                        ms(self.wait_ttl), self.preferred(usable, prefix), self.slack,
                        len(replicas) * self.max_queue]  # fmt: skip
                chosen = await self.admit_script(keys=keys, args=args)
                if chosen == -1:
                    raise QueueFull
                if chosen:
                    ticket = Ticket(deployment_id, token, capacity, usable[int(chosen) - 1], rank)
                    self.held[token] = ticket
                    return ticket
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QueueTimeout
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken, min(self.poll, left))
        except BaseException:
            if token not in self.held:  # waiting, or the script's answer never came: leave the queue
                await asyncio.shield(self._release(deployment_id, token, capacity, None))
            raise
        finally:
            self.waiting.pop(token, None)

    async def repick(self, ticket: Ticket, replicas: tuple[ReplicaRoute, ...], prefix: str,
                     tried: set[int]) -> ReplicaRoute | None:  # fmt: skip
        """Another replica for a request whose replica failed before answering (None: none left)."""
        usable = self.usable(replicas, tried)
        if not usable:
            return None
        keys = [replica_key(ticket.deployment_id, ticket.replica.pk),
                *(replica_key(ticket.deployment_id, r.pk) for r in usable)]  # fmt: skip
        chosen = await self.repick_script(keys=keys, args=[ticket.token, int(self.lease * 1000),
                                                           self.preferred(usable, prefix), self.slack])  # fmt: skip
        ticket.replica = usable[int(chosen) - 1]
        return ticket.replica

    def _observation(self, ticket: Ticket, ttft: float | None, target: float | None) -> list[Any]:
        """The release's feedback to the safe concurrency: only answers of the classes above the
        lowest teach it (the lowest is what it holds back)."""
        if ttft is None or ticket.rank >= len(self.shares) - 1:
            return []
        return [round(ttft * 1000, 3), round((target or 0) * 1000, 3), self.tolerance]

    async def release(self, ticket: Ticket, ttft: float | None = None, target: float | None = None) -> None:
        """Give the room back; ``ttft`` (seconds, engine side) and the deployment's p99 TTFT ``target``
        teach the safe concurrency."""
        self.held.pop(ticket.token, None)
        await asyncio.shield(self._release(ticket.deployment_id, ticket.token, ticket.capacity, ticket.replica.pk,
                                           self._observation(ticket, ttft, target)))  # fmt: skip

    def release_in(self, pipe: redis.asyncio.client.Pipeline, ticket: Ticket, ttft: float | None = None,
                   target: float | None = None) -> None:  # fmt: skip
        """Queue the release on ``pipe`` (the settlement's round trip, gateway/accounting.py). When
        Redis lost the script meanwhile the pipeline answers NoScriptError: call ``release`` then."""
        self.held.pop(ticket.token, None)
        held, wait, wexp, *_rest, control = _keys(ticket.deployment_id)
        keys = [held, replica_key(ticket.deployment_id, ticket.replica.pk), wait, wexp, control]
        pipe.evalsha(self.release_script.sha, len(keys), *keys, ticket.token, ticket.capacity,
                     *self._observation(ticket, ttft, target))  # fmt: skip

    async def _release(self, deployment_id: int, token: str, capacity: int, replica_id: int | None,
                       observation: list[Any] | None = None) -> None:  # fmt: skip
        held, wait, wexp, *_rest, control = _keys(deployment_id)
        replica = replica_key(deployment_id, replica_id or 0)
        try:
            await self.release_script(keys=[held, replica, wait, wexp, control],
                                      args=[token, capacity, *(observation or [])])  # fmt: skip
        except (redis.RedisError, OSError) as exc:  # the lease runs out instead
            log.warning("could not give back room on deployment %s (%s)", deployment_id, exc)

    async def safe(self, deployment_id: int) -> tuple[float | None, float | None]:
        """The learned safe concurrency and typical time to first token (ms) of a deployment."""
        found = await self.client.hmget(_keys(deployment_id)[5], "safe", "typical")
        return tuple(float(v) if v is not None else None for v in found)  # type: ignore[return-value]

    async def in_flight(self, deployment_id: int, replica_id: int | None = None) -> int:
        """Requests in flight on a deployment (or one of its replicas), over all processes."""
        key = replica_key(deployment_id, replica_id) if replica_id else _keys(deployment_id)[0]
        return await self.client.zcount(key, int(time.time() * 1000), "+inf")

    # -- background ------------------------------------------------------------------------------
    async def _listen(self) -> None:
        """Wake this process's waiter whose token another process (or this one) published."""
        while True:
            try:
                async with self.client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(WAKE_CHANNEL)
                    async for message in pubsub.listen():
                        future = self.waiting.get(message["data"].decode())
                        if future is not None and not future.done():
                            future.set_result(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: waiters poll meanwhile
                log.warning("gateway wake-ups lost (%s); retrying", exc)
                await asyncio.sleep(1)

    async def _renew(self) -> None:
        """Keep the room of running requests (long streams) beyond the lease."""
        while True:
            await asyncio.sleep(self.lease / 3)
            tickets = list(self.held.values())
            if not tickets:
                continue
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.scripts.add(self.renew_script)  # loaded first if Redis lost it
                    for ticket in tickets:
                        keys = [_keys(ticket.deployment_id)[0], replica_key(ticket.deployment_id, ticket.replica.pk)]
                        pipe.evalsha(self.renew_script.sha, 2, *keys, ticket.token, int(self.lease * 1000))
                    await pipe.execute()
            except (redis.RedisError, OSError) as exc:
                log.warning("could not renew %d requests' room (%s)", len(tickets), exc)
