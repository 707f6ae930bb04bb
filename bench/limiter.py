"""Benchmark: the quota limiter's admission path against the local Redis, from one process.

Rows, side by side in one run, each CALLERS concurrent callers for SECONDS after a warm-up:
- AsyncLimiter (the gateway's), asyncio on uvloop as uvicorn runs it: ``admit`` with every limit on
  (rpm, tpm, day and month budgets, concurrency), all set high enough that every admission is
  allowed. First row (the headline, what the issue measures): admissions alone. Second: after each
  one its settle (which releases the lease) and a usage entry go out in one pipeline, as the
  gateway sends them; settles run but are not in the admission latency.
- the same with the settles of all callers queued and sent by one task in one pipeline at a time
  (a comparison: not what the gateway does);
- the same script over the sync Limiter, from CALLERS threads;
- baseline: a bare redis-py asyncio ``INCR`` + ``EXPIRE`` pipeline (one round trip), no settle.
With hiredis installed, the AsyncLimiter and baseline rows are run again with redis-py's
pure-Python reply parser (what they cost without hiredis), and the batched row once more with
hiredis packing the commands too (redis-py's asyncio client packs them in Python).

Columns: admissions per second; p50/p99 of one admission; this process' CPU per admission (settle
and warm-up included); Redis' CPU per admission (commandstats of EVALSHA, XADD, INCRBY, EXPIRE:
admit, settle and usage entry); round trips per admission (requests written to Redis, the settle
pipelines left out); admissions denied (a lease that a settle did not release would show here).
Goal (issue #6): one round trip per admission, >= 10,000 admissions/s, p99 <= 10 ms.
Run: .venv/bin/python bench/limiter.py   (uses Redis db 9, flushed before and after)
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
CALLERS = int(os.environ.get("BENCH_CALLERS", "64"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
WARMUP = 1.0
DEPARTMENTS = 16
RESERVE, USED = 1000, 700  # prompt + max_tokens reserved, tokens the answer really used


def setup() -> None:
    os.environ.update(DJANGO_SETTINGS_MODULE="appliance.settings", REDIS_URL=REDIS_URL, LOG_LEVEL="WARNING")
    import django

    django.setup()


def limits() -> Any:
    from tenancy.limiter import Limits

    # Each department has CALLERS / DEPARTMENTS callers at most: a lease that a settle failed to
    # release would show as a denial. The rates are far above what one process can send.
    return Limits(rpm=10**9, tpm=10**12, tokens_per_day=10**15, tokens_per_month=10**16, concurrency=CALLERS)


@dataclass
class Row:
    label: str
    latencies: list[float] = field(default_factory=list)  # seconds, admissions started in the window
    admissions: int = 0  # all of them, warm-up included (for the round-trip count)
    denied: int = 0
    settles: int = 0  # settle pipelines sent (one round trip each)
    sends: int = 0  # round trips: requests (a command or a whole pipeline) written to Redis
    cpu_s: float = 0.0
    commands: dict[str, tuple[int, float]] = field(default_factory=dict)  # command: (calls, usec)

    def record(self, started: float, finished: float, window: tuple[float, float], allowed: bool) -> None:
        self.admissions += 1
        self.denied += not allowed
        if window[0] <= started < window[1]:
            self.latencies.append(finished - started)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

    @property
    def per_s(self) -> float:
        return len(self.latencies) / SECONDS

    def summary(self) -> dict[str, Any]:
        # Top-level commands only: commandstats also lists the commands a script runs, inside its own time.
        server_usec = sum(self.commands.get(name, (0, 0.0))[1] for name in ("evalsha", "xadd", "incrby", "expire"))
        return {
            "label": self.label,
            "admissions_per_s": round(self.per_s),
            "p50_ms": round(self.percentile(0.50), 3),
            "p99_ms": round(self.percentile(0.99), 3),
            "client_cpu_us": round(self.cpu_s / max(1, self.admissions) * 1e6, 1),
            "redis_us": round(server_usec / max(1, self.admissions), 1),
            "round_trips_per_admission": round((self.sends - self.settles) / max(1, self.admissions), 2),
            "denied": self.denied,
        }


def counting(connection_class: Any) -> Any:
    """``connection_class`` counting the requests it writes (a command, or a whole pipeline), less
    a new connection's hand-shake (HELLO, SELECT, CLIENT SETINFO)."""

    class Counting(connection_class):
        sends = itertools.count()
        handshake = False

        def send_packed_command(self, *args: Any, **kwargs: Any) -> Any:
            if not self.handshake:
                next(Counting.sends)  # atomic under the GIL, so threads may share it
            return super().send_packed_command(*args, **kwargs)

        if asyncio.iscoroutinefunction(connection_class.on_connect_check_health):

            async def on_connect_check_health(self, *args: Any, **kwargs: Any) -> None:
                self.handshake = True
                try:
                    await super().on_connect_check_health(*args, **kwargs)
                finally:
                    self.handshake = False

        else:

            def on_connect_check_health(self, *args: Any, **kwargs: Any) -> None:
                self.handshake = True
                try:
                    super().on_connect_check_health(*args, **kwargs)
                finally:
                    self.handshake = False

    return Counting


def sends(connection_class: Any) -> int:
    return next(connection_class.sends)


def commandstats(client: Any) -> dict[str, tuple[int, float]]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), float(v["usec"])) for name, v in stats.items()}


def command_delta(before: dict, after: dict) -> dict[str, tuple[int, float]]:
    delta = {}
    for name, (calls, usec) in after.items():
        old_calls, old_usec = before.get(name, (0, 0.0))
        if calls > old_calls and name not in ("info", "flushdb", "config|resetstat"):
            delta[name] = (calls - old_calls, usec - old_usec)
    return delta


def usage_fields(department_id: int) -> dict[str, str]:
    from tenancy import usage

    return usage.entry(department_id=department_id, key_id=department_id, deployment_id=1, model="bench",
                       endpoint="chat", prompt_tokens=400, completion_tokens=USED - 400, latency_ms=12.5)  # fmt: skip


def measured(label: str, run: Any, sync_client: Any) -> Row:
    """Run one row, with Redis' command counts and this process' CPU time around it."""
    sync_client.flushdb()
    before = commandstats(sync_client)
    cpu = time.process_time()
    row = run(Row(label))
    row.cpu_s = time.process_time() - cpu
    row.commands = command_delta(before, commandstats(sync_client))
    return row


def window() -> tuple[float, float]:
    """The measured window: admissions started in it count, after WARMUP seconds."""
    start = time.perf_counter() + WARMUP
    return start, start + SECONDS


# --- the rows -------------------------------------------------------------------------------------


def hiredis_packing() -> Any:
    """redis-py's asyncio connection packs commands in Python even with hiredis installed (its sync
    one uses ``hiredis.pack_command``): this one uses hiredis for that too (a comparison)."""
    import hiredis
    import redis.asyncio

    class HiredisPacking(redis.asyncio.Connection):
        def pack_command(self, *args: Any) -> list[bytes]:
            if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD" and the like: two words
                args = (*args[0].split(), *args[1:])
            return [hiredis.pack_command(args)]

    return HiredisPacking


def async_limiter(
    row: Row, parser: Any, batched: bool = False, connection_base: Any = None, settles: bool = True
) -> Row:
    """``batched``: instead of one pipeline per request, callers queue their settles and one task
    sends whatever has queued in a single pipeline (not what the gateway does: a comparison)."""
    import redis.asyncio

    from tenancy import usage
    from tenancy.limiter import ADMIT, SETTLE, AsyncLimiter

    lim = limits()
    if not settles:  # leases are never released in this row: a concurrency limit that still runs, never binds
        lim = dataclasses.replace(lim, concurrency=10**9)

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(REDIS_URL, parser_class=parser, connection_class=connection)
        limiter = AsyncLimiter(client)
        await client.script_load(ADMIT)
        await client.script_load(SETTLE)
        begin, end = window()
        queued: list[tuple[int, Any, dict]] = []
        wake, finished = asyncio.Event(), asyncio.Event()

        async def settle(batch: list[tuple[int, Any, dict]]) -> None:
            pipe = client.pipeline(transaction=False)
            for department, decision, fields in batch:
                limiter.settle_in(pipe, department, lim, decision, USED)
                pipe.xadd(usage.STREAM, fields)
            await pipe.execute()
            row.settles += 1

        async def flusher() -> None:
            while queued or not finished.is_set():
                await wake.wait()
                wake.clear()
                batch = queued[:]
                queued.clear()
                if batch:
                    await settle(batch)

        async def caller(i: int) -> None:
            department = i % DEPARTMENTS + 1
            fields = usage_fields(department)
            while (started := time.perf_counter()) < end:
                decision = await limiter.admit(department, lim, RESERVE)
                row.record(started, time.perf_counter(), (begin, end), decision.allowed)
                if not settles:
                    continue
                if decision.allowed and batched:
                    queued.append((department, decision, fields))
                    wake.set()
                elif decision.allowed:
                    await settle([(department, decision, fields)])

        flushing = asyncio.ensure_future(flusher())
        await asyncio.gather(*(caller(i) for i in range(CALLERS)))
        finished.set()
        wake.set()
        await flushing
        await client.aclose()

    connection = counting(connection_base or redis.asyncio.Connection)
    run_loop(main())
    row.sends = sends(connection)
    return row


def sync_limiter(row: Row, parser: Any) -> Row:
    import redis

    from tenancy import usage
    from tenancy.limiter import ADMIT, SETTLE, Limiter, _settle_call

    lim = limits()
    connection = counting(redis.Connection)
    client = redis.Redis.from_url(REDIS_URL, parser_class=parser, connection_class=connection,
                                  max_connections=CALLERS * 2)  # fmt: skip
    limiter = Limiter(client)
    client.script_load(ADMIT)
    client.script_load(SETTLE)
    lock = threading.Lock()
    gate = threading.Barrier(CALLERS + 1)
    begin, end = 0.0, 0.0

    def caller(i: int) -> None:
        department = i % DEPARTMENTS + 1
        fields = usage_fields(department)
        samples: list[tuple[float, float, bool]] = []
        gate.wait()
        while (started := time.perf_counter()) < end:
            decision = limiter.admit(department, lim, RESERVE)
            samples.append((started, time.perf_counter(), decision.allowed))
            if decision.allowed:
                # Limiter has no settle_in: the same EVALSHA + XADD pipeline the gateway sends.
                keys, args = _settle_call(department, lim, decision, USED)
                pipe = client.pipeline(transaction=False)
                pipe.evalsha(limiter.settle_script.sha, len(keys), *keys, *args)
                pipe.xadd(usage.STREAM, fields)
                pipe.execute()
        with lock:
            row.settles += sum(allowed for _, _, allowed in samples)
            for started, finished, allowed in samples:
                row.record(started, finished, (begin, end), allowed)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    begin, end = window()
    gate.wait()
    for thread in threads:
        thread.join()
    client.close()
    row.sends = sends(connection)
    return row


def baseline(row: Row, parser: Any) -> Row:
    import redis.asyncio

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(REDIS_URL, parser_class=parser, connection_class=connection)
        begin, end = window()

        async def caller(i: int) -> None:
            key = f"bench:{{dept:{i % DEPARTMENTS + 1}}}:count"
            while (started := time.perf_counter()) < end:
                pipe = client.pipeline(transaction=False)
                pipe.incr(key)
                pipe.expire(key, 120)
                await pipe.execute()
                row.record(started, time.perf_counter(), (begin, end), True)

        await asyncio.gather(*(caller(i) for i in range(CALLERS)))
        await client.aclose()

    connection = counting(redis.asyncio.Connection)
    run_loop(main())
    row.sends = sends(connection)
    return row


def run_loop(main: Any) -> None:
    try:
        import uvloop  # what uvicorn runs the gateway on when it is installed
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main() -> None:
    setup()
    import redis
    from redis._parsers import _AsyncRESP2Parser, _RESP2Parser
    from redis.utils import HIREDIS_AVAILABLE

    loop = "uvloop" if _has("uvloop") else "asyncio"
    sync_client = redis.Redis.from_url(REDIS_URL)
    python = (_AsyncRESP2Parser, _RESP2Parser)
    default = python
    if HIREDIS_AVAILABLE:
        from redis._parsers import _AsyncHiredisParser, _HiredisParser

        default = (_AsyncHiredisParser, _HiredisParser)
    parser_name = "hiredis" if HIREDIS_AVAILABLE else "Python parser"
    rows: list[Row] = []
    load = os.getloadavg()[0]  # other work on the machine shows in the figures
    try:
        sync_client.flushdb()
        plan = [
            (f"AsyncLimiter.admit only, {loop}, {parser_name}", lambda r: async_limiter(r, default[0], settles=False)),
            (f"AsyncLimiter.admit + settle each, {loop}, {parser_name}", lambda r: async_limiter(r, default[0])),
            (f"AsyncLimiter.admit, settles batched, {parser_name}", lambda r: async_limiter(r, default[0], True)),
            (f"Limiter.admit (sync), {CALLERS} threads, {parser_name}", lambda r: sync_limiter(r, default[1])),
            (f"baseline: INCR+EXPIRE pipeline, {loop}, {parser_name}", lambda r: baseline(r, default[0])),
        ]
        if HIREDIS_AVAILABLE:
            plan += [
                (
                    "AsyncLimiter.admit, settles batched, hiredis packing too",
                    lambda r: async_limiter(r, default[0], True, hiredis_packing()),
                ),
                (f"AsyncLimiter.admit + settle each, {loop}, Python parser", lambda r: async_limiter(r, python[0])),
                (f"baseline: INCR+EXPIRE pipeline, {loop}, Python parser", lambda r: baseline(r, python[0])),
            ]
        for label, run in plan:
            rows.append(measured(label, run, sync_client))
    finally:
        sync_client.flushdb()
        sync_client.close()

    summaries = [row.summary() for row in rows]
    print(
        f"\n{CALLERS} concurrent callers, {SECONDS:g} s each after {WARMUP:g} s warm-up, one process, Redis {REDIS_URL}"
    )
    print(f"settle + usage entry pipelined after each limiter admission (not in its latency); {os.cpu_count()} CPUs, "
          f"load average at start {load:.2f}\n")  # fmt: skip
    head = ["admissions/s", "p50 ms", "p99 ms", "client CPU µs/adm", "Redis µs/adm", "round trips/adm", "denied"]
    print(f"| {'row':56} | " + " | ".join(head) + " |")
    print(f"|{'-' * 58}|" + "|".join("-" * (len(h) + 1) + ":" for h in head) + "|")
    for s in summaries:
        values = [f"{s['admissions_per_s']:,}", f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", f"{s['client_cpu_us']:.0f}",
                  f"{s['redis_us']:.1f}", f"{s['round_trips_per_admission']:.2f}", str(s["denied"])]  # fmt: skip
        print(f"| {s['label']:56} | " + " | ".join(v.rjust(len(h)) for v, h in zip(values, head, strict=True)) + " |")
    limiter_row = rows[0]
    admit_calls = limiter_row.commands.get("evalsha", (0, 0))[0]
    scripts = {k: v[0] for k, v in limiter_row.commands.items() if k.startswith("script")}
    print(f"\n{limiter_row.label}: {admit_calls:,} EVALSHA in Redis for {limiter_row.admissions:,} admissions and "
          f"{limiter_row.settles:,} settles; SCRIPT calls: {scripts} (the two loads before the run)")  # fmt: skip
    first = summaries[0]
    met = first["admissions_per_s"] >= 10_000 and first["p99_ms"] <= 10
    print(f"goal: >= 10,000 admissions/s and p99 <= 10 ms: {'met' if met else 'missed'}")
    print(json.dumps({k: first[k] for k in ("admissions_per_s", "p50_ms", "p99_ms")}))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
