"""The gate's classes and the replica choice, without a server."""

from __future__ import annotations

import asyncio

import pytest

from gateway.balancer import Balancer, Gate, QueueTimeout
from gateway.directory import ReplicaRoute


def test_low_class_holds_only_its_share_while_high_is_active() -> None:
    async def main() -> None:
        gate = Gate(8, shares=(1.0, 0.75, 0.25), window=10)
        for _ in range(8):
            await gate.acquire(2, timeout=0.1)  # alone, low may use everything
        for _ in range(8):
            gate.release()
        await gate.acquire(0, timeout=0.1)  # high is active now
        await gate.acquire(2, timeout=0.1)
        with pytest.raises(QueueTimeout):
            await gate.acquire(2, timeout=0.05)  # 2 in flight = low's share of 8
        for _ in range(6):
            await gate.acquire(0, timeout=0.1)  # high still finds room at once
        assert gate.in_flight == 8

    asyncio.run(main())


def test_waiters_served_best_class_first() -> None:
    async def main() -> None:
        gate = Gate(1)
        await gate.acquire(1, timeout=0.1)
        order: list[str] = []

        async def wait(rank: int, name: str) -> None:
            await gate.acquire(rank, timeout=1)
            order.append(name)
            gate.release()

        tasks = [asyncio.ensure_future(wait(2, "low-1")), asyncio.ensure_future(wait(2, "low-2"))]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.ensure_future(wait(0, "high")))
        await asyncio.sleep(0.01)
        gate.release()
        await asyncio.gather(*tasks)
        assert order == ["high", "low-1", "low-2"] and gate.in_flight == 0

    asyncio.run(main())


def test_a_cancelled_waiter_passes_its_room_on() -> None:
    async def main() -> None:
        gate = Gate(1)
        await gate.acquire(0, timeout=0.1)
        waiter = asyncio.ensure_future(gate.acquire(0, timeout=1))
        await asyncio.sleep(0.01)
        waiter.cancel()
        gate.release()
        await gate.acquire(0, timeout=0.1)
        assert gate.in_flight == 1

    asyncio.run(main())


def test_prefix_affinity_and_least_outstanding() -> None:
    balancer = Balancer(64, slack=2)
    replicas = tuple(ReplicaRoute(pk, f"http://127.0.0.1:{9000 + pk}", "k") for pk in (1, 2, 3))
    prompt = "You are a contracts assistant. " * 20
    first = balancer.pick(replicas, prompt, set())
    assert all(balancer.pick(replicas, prompt, set()) == first for _ in range(5))  # same prefix, same replica
    balancer.outstanding[first.pk] = 10  # busier than the others by more than the slack
    assert balancer.pick(replicas, prompt, set()) != first
    assert balancer.pick(replicas, "", set()).pk != first.pk  # no prefix: the least busy
    balancer.mark_down(2)
    assert balancer.pick(replicas, "", {first.pk}).pk not in (2, first.pk) or first.pk == 2
    assert balancer.pick(replicas, "", {1, 2, 3}) is None
