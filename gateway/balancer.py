"""Choosing a replica and waiting for room on a saturated deployment.

- ``Gate``: at most ``capacity`` requests of a deployment in flight from this process, lower
  priority classes held to a share of it while higher ones are active; the rest wait in a queue
  ordered by priority class (high first, then arrival), each for at most the queue timeout, after
  which the caller answers 429.
- ``pick``: least outstanding requests, with prefix affinity: requests that share the start of
  their prompt prefer the same replica (rendezvous hashing) so vLLM's prefix cache is reused,
  unless that replica is busier than the least busy one by more than ``slack``.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import time
from collections import defaultdict

from gateway.directory import ReplicaRoute


class QueueTimeout(Exception):
    pass


class Gate:
    """Room for a deployment's requests, shared by priority class.

    High-priority requests may fill the whole capacity. While a higher class has sent requests in
    the last ``window`` seconds, a lower class may hold only its share of it (``shares``), so a
    burst from a low-priority department cannot fill the engines' batches and slow a high-priority
    department's first tokens; with no higher class around, any class may use everything. Waiters
    are served best class first, then in arrival order.
    """

    def __init__(self, capacity: int, shares: tuple[float, ...] = (1.0, 1.0, 1.0), window: float = 10.0) -> None:
        self.capacity = max(1, capacity)
        self.shares, self.window = shares, window
        self.in_flight = 0
        self.last_seen = [float("-inf")] * len(shares)
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()

    def limit(self, rank: int, now: float) -> int:
        """How many requests may be in flight when one of class ``rank`` is admitted."""
        if any(now - seen < self.window for seen in self.last_seen[:rank]):
            return max(1, int(self.capacity * self.shares[rank]))
        return self.capacity

    def _ahead(self, rank: int) -> bool:
        return any(r <= rank and not f.done() for r, _, f in self._waiters)

    def _dispatch(self) -> None:
        """Hand free room to waiters, best class first; a class held back by its share holds back the
        classes below it too (their shares are no larger)."""
        now = time.monotonic()
        while self._waiters:
            rank, _order, future = self._waiters[0]
            if future.done():
                heapq.heappop(self._waiters)
                continue
            if self.in_flight >= self.limit(rank, now):
                return
            heapq.heappop(self._waiters)
            self.in_flight += 1
            future.set_result(None)

    async def acquire(self, rank: int, timeout: float) -> None:
        now = time.monotonic()
        self.last_seen[rank] = now
        if self.in_flight < self.limit(rank, now) and not self._ahead(rank):
            self.in_flight += 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._order), future))
        self._dispatch()
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            if future.done() and not future.cancelled():
                return  # granted just as the wait ran out: keep the room
            future.cancel()
            raise QueueTimeout from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted, but the caller went away: pass the room on
            else:
                future.cancel()
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._dispatch()


class Balancer:
    """Per-process view of the replicas: outstanding requests, and ones whose connection just failed."""

    def __init__(
        self, capacity_per_replica: int, slack: int = 4, shares: tuple[float, ...] = (1.0, 1.0, 1.0),
        window: float = 10.0,
    ) -> None:  # fmt: skip
        self.capacity_per_replica = capacity_per_replica
        self.shares, self.window = shares, window
        self.slack = slack
        self.outstanding: dict[int, int] = defaultdict(int)
        self.down_until: dict[int, float] = {}
        self.gates: dict[int, Gate] = {}

    def gate(self, deployment_id: int, replicas: int) -> Gate:
        gate = self.gates.get(deployment_id)
        if gate is None:
            gate = self.gates[deployment_id] = Gate(replicas * self.capacity_per_replica, self.shares, self.window)
        gate.capacity = max(1, replicas * self.capacity_per_replica)
        return gate

    def pick(self, replicas: tuple[ReplicaRoute, ...], prefix: str, exclude: set[int]) -> ReplicaRoute | None:
        now = time.monotonic()
        usable = [r for r in replicas if r.pk not in exclude and self.down_until.get(r.pk, 0) <= now]
        if not usable:
            usable = [r for r in replicas if r.pk not in exclude]  # all marked down: try anyway
        if not usable:
            return None
        least = min(usable, key=lambda r: self.outstanding[r.pk])
        if len(usable) == 1 or not prefix:
            return least
        digest = prefix.encode()
        preferred = max(usable, key=lambda r: hashlib.blake2b(digest + r.pk.to_bytes(8, "big"), digest_size=8).digest())
        if self.outstanding[preferred.pk] <= self.outstanding[least.pk] + self.slack:
            return preferred
        return least

    def mark_down(self, replica_id: int, seconds: float = 5.0) -> None:
        self.down_until[replica_id] = time.monotonic() + seconds
