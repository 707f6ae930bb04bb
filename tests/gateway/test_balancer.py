"""The shared gate and the replica choice, against the tests' Redis, without a server. Two
``Balancer`` objects stand for two gateway processes (web workers or console instances)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
from django.conf import settings

from gateway.balancer import Balancer, QueueFull, QueueTimeout, Ticket
from gateway.directory import ReplicaRoute

ONE = (ReplicaRoute(1, "http://127.0.0.1:9001", "k"),)
THREE = tuple(ReplicaRoute(pk, f"http://127.0.0.1:{9000 + pk}", "k") for pk in (1, 2, 3))


def run(test: Callable[..., Awaitable[None]], processes: int = 2, **options: Any) -> None:
    """Run ``test(*balancers)`` with ``processes`` balancers, each on its own Redis connection pool."""

    async def main() -> None:
        clients = [redis.asyncio.Redis.from_url(settings.REDIS_URL) for _ in range(processes)]
        balancers = [Balancer(client, **{"capacity_per_replica": 8, **options}) for client in clients]
        await asyncio.sleep(0.05)  # subscribed to the wake-ups
        try:
            await test(*balancers)
        finally:
            for balancer, client in zip(balancers, clients, strict=True):
                await balancer.close()
                await client.aclose()

    asyncio.run(main())


def test_low_class_holds_only_its_share_while_high_is_active() -> None:
    async def test(a: Balancer, b: Balancer) -> None:
        tickets = [await a.admit(7, ONE, 2, "", timeout=0.1) for _ in range(8)]  # alone, low may use all
        for ticket in tickets:
            await a.release(ticket)
        await a.admit(7, ONE, 0, "", timeout=0.1)  # high is active now (seen by the other process too)
        await b.admit(7, ONE, 2, "", timeout=0.1)
        with pytest.raises(QueueTimeout):
            await b.admit(7, ONE, 2, "", timeout=0.05)  # 2 in flight = low's share of 8
        for _ in range(6):
            await b.admit(7, ONE, 0, "", timeout=0.1)  # high still finds room at once
        assert await a.in_flight(7) == 8
        with pytest.raises(QueueTimeout):
            await a.admit(7, ONE, 0, "", timeout=0.05)  # full, for both processes

    run(test, shares=(1.0, 0.75, 0.25))


def test_waiters_served_best_class_first_across_processes() -> None:
    async def test(a: Balancer, b: Balancer) -> None:
        first = await a.admit(7, ONE, 1, "", timeout=0.1)
        order: list[str] = []

        async def wait(balancer: Balancer, rank: int, name: str) -> None:
            ticket = await balancer.admit(7, ONE, rank, "", timeout=2)
            order.append(name)
            await balancer.release(ticket)

        tasks = [asyncio.ensure_future(wait(b, 2, "low-1"))]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.ensure_future(wait(a, 2, "low-2")))
        await asyncio.sleep(0.05)
        tasks.append(asyncio.ensure_future(wait(b, 0, "high")))
        await asyncio.sleep(0.05)
        await a.release(first)
        await asyncio.gather(*tasks)
        assert order == ["high", "low-1", "low-2"]
        assert await a.in_flight(7) == 0

    run(test, capacity_per_replica=1)


def test_wake_up_is_immediate_not_polled() -> None:
    """A waiter in another process gets freed room within milliseconds, not at its next poll."""

    async def test(a: Balancer, b: Balancer) -> None:
        held = await a.admit(7, ONE, 1, "", timeout=0.1)
        waiter = asyncio.ensure_future(b.admit(7, ONE, 1, "", timeout=5))
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        released = loop.time()
        await a.release(held)
        await waiter
        assert loop.time() - released < 0.5  # the poll is 5 s here

    run(test, capacity_per_replica=1, poll=5.0)


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def test(a: Balancer, b: Balancer) -> None:
        held = await a.admit(7, ONE, 0, "", timeout=0.1)
        waiter = asyncio.ensure_future(b.admit(7, ONE, 0, "", timeout=5))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await a.release(held)
        await a.admit(7, ONE, 0, "", timeout=0.1)  # the cancelled one did not take the room
        assert await a.in_flight(7) == 1

    run(test, capacity_per_replica=1)


def test_room_of_a_process_that_died_comes_back_after_its_lease() -> None:
    async def test(a: Balancer, b: Balancer) -> None:
        await a.admit(7, ONE, 0, "", timeout=0.1)
        await a.close()  # the process is gone: no release, no renewal
        with pytest.raises(QueueTimeout):
            await b.admit(7, ONE, 0, "", timeout=0.1)
        await b.admit(7, ONE, 0, "", timeout=2)  # lease ran out

    run(test, capacity_per_replica=1, lease=0.6)


def test_running_requests_keep_their_room_beyond_the_lease() -> None:
    async def test(a: Balancer, b: Balancer) -> None:
        await a.admit(7, ONE, 0, "", timeout=0.1)
        await asyncio.sleep(1.5)  # renewed every lease / 3
        with pytest.raises(QueueTimeout):
            await b.admit(7, ONE, 0, "", timeout=0.1)

    run(test, capacity_per_replica=1, lease=0.6)


def test_prefix_affinity_and_least_outstanding_over_processes() -> None:
    async def test(a: Balancer, b: Balancer) -> None:
        prompt = "You are a contracts assistant. " * 20
        tickets: list[Ticket] = [await a.admit(7, THREE, 1, prompt, timeout=0.1)]
        preferred = tickets[0].replica
        for balancer in (b, a):  # same prefix, same replica, whichever process
            tickets.append(await balancer.admit(7, THREE, 1, prompt, timeout=0.1))
            assert tickets[-1].replica == preferred
        assert await b.in_flight(7, preferred.pk) == 3
        # More than ``slack`` (2) busier than the others: the prefix goes elsewhere, and so does a
        # request with no prefix.
        assert (await b.admit(7, THREE, 1, prompt, timeout=0.1)).replica != preferred
        assert (await b.admit(7, THREE, 1, "", timeout=0.1)).replica != preferred
        # A failed replica: another one, never one already tried, none when all were tried.
        ticket = tickets[0]
        a.mark_down(ticket.replica.pk)
        other = await a.repick(ticket, THREE, prompt, {preferred.pk})
        assert other is not None and other != preferred and await a.in_flight(7, preferred.pk) == 2
        assert await a.repick(ticket, THREE, prompt, {1, 2, 3}) is None

    run(test, slack=2)


def test_redis_down_is_an_error_not_a_free_pass() -> None:
    async def main() -> None:
        client = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
        balancer = Balancer(client, 8)
        try:
            with pytest.raises(redis.ConnectionError):
                await balancer.admit(7, ONE, 0, "", timeout=0.1)
        finally:
            await balancer.close()
            await client.aclose()

    asyncio.run(main())


def test_a_full_queue_refuses_at_once_but_never_for_a_better_class() -> None:
    async def test(a: Balancer, b: Balancer) -> None:
        first = await a.admit(7, ONE, 2, "", timeout=0.1)

        async def through(balancer: Balancer) -> None:
            await balancer.release(await balancer.admit(7, ONE, 2, "", timeout=5))

        waiting = [asyncio.ensure_future(through(p)) for p in (a, b)]
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        with pytest.raises(QueueFull):
            await b.admit(7, ONE, 2, "", timeout=5)  # two low ones wait already: refused, not after 5 s
        assert asyncio.get_running_loop().time() - started < 1
        high = asyncio.ensure_future(b.admit(7, ONE, 0, "", timeout=5))  # a high one still queues, first
        await asyncio.sleep(0.1)
        await a.release(first)
        served = await high
        await b.release(served)
        await asyncio.gather(*waiting)  # the waiting low ones were served after it
        assert await a.in_flight(7) == 0

    run(test, capacity_per_replica=1, max_queue=2)


def test_late_answers_of_a_better_class_shrink_the_room_of_the_lower_ones() -> None:
    """The safe concurrency: answers of the high class later than the deployment's target lower it
    (a low request then waits while high is active, though its share would admit it); answers in
    time while the limit holds the low class back raise it again."""

    async def test(a: Balancer, b: Balancer) -> None:
        high = await a.admit(7, ONE, 0, "", timeout=0.1)
        lows = [await b.admit(7, ONE, 2, "", timeout=0.1) for _ in range(3)]  # share: 4 of 8
        for ticket in lows:
            await b.release(ticket)
        for _ in range(6):  # six late high answers (target 100 ms): 8 * 0.8^6 = 2.1 in flight at most
            ticket = await a.admit(7, ONE, 0, "", timeout=0.1)
            await a.release(ticket, ttft=0.5, target=0.1)
        safe, _typical = await a.safe(7)
        assert 2 <= safe < 3
        low = await b.admit(7, ONE, 2, "", timeout=0.1)  # the high one and this: 2
        with pytest.raises(QueueTimeout):
            await b.admit(7, ONE, 2, "", timeout=0.05)
        for _ in range(8):  # answers in time while the limit is what holds: up again
            ticket = await a.admit(7, ONE, 0, "", timeout=0.1)
            await a.release(ticket, ttft=0.05, target=0.1)
        assert (await a.safe(7))[0] > safe
        await b.release(low)
        await a.release(high)
        lowest = await b.admit(7, ONE, 2, "", timeout=0.1)
        await b.release(lowest, ttft=9.0, target=0.1)  # the lowest class's answers teach nothing
        assert (await a.safe(7))[0] > safe

    run(test, shares=(1.0, 0.75, 0.5))
