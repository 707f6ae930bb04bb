"""Benchmark: the /v1 gateway, everything in one run, one table.

(a) Against a minimal local mock upstream (tests/gateway/fake_engine.py, a FAKE engine answering at
    once): requests/s at 32 connections (wrk, 10 s) and single-request latency p50/p99 (1,000
    sequential requests), for the mock called directly (the limit), through our gateway (auth,
    limiter, metering, usage records on; `uvicorn appliance.asgi:application --workers 2`) and
    through LiteLLM's proxy (`litellm[proxy]` in its own virtual environment under var/bench,
    made on first use; master key auth, 2 workers), all pointed at the same mock.
(b) Against the real vLLM CPU engine with the tiny model: throughput at 32 concurrent requests
    (16 output tokens), streaming and not, and the time to first token p50, direct vs gateway.
    The engine is pinned to core 0 and the load and the gateway to core 1 (in b and c): the CPU
    engine's OpenMP threads spin on every core they hold, and sharing them halved the throughput
    of anything beside it (a GPU engine leaves the host's cores alone).
(v) What strict admission costs: the median time to parse and validate a typical chat request
    (gateway/admission.py, msgspec schemas) beside a bare orjson.loads of the same body (no checks).
(c) Two departments, high and low priority, the low one bursting 10x its normal rate (past what the
    engine serves): the high one's p99 time to first token with and without the burst, FIFO (both one
    class) and with priority (gateway queue and safe concurrency by class, vLLM's
    `--scheduling-policy priority`), and the answers per second of each; BENCH_RUNS runs (5), the
    worst reported. Also the time of one scrape of the engine's /metrics.

Needs `wrk` (installed from Debian when run as root). Run: .venv/bin/python bench/gateway.py
BENCH_PARTS=a,v,b,c chooses parts; BENCH_SECONDS sets the length of each load phase.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, console, engine_and_tiny_model, need

PARTS = set(os.environ.get("BENCH_PARTS", "a,v,b,c").split(","))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
RUNS = int(os.environ.get("BENCH_RUNS", "5"))  # part c: the worst of these runs is reported
HIGH_RATE, LOW_RATE = 10.0, 10.0  # requests/s in part c; the burst is 10x LOW_RATE, past what the engine serves
LITELLM_VENV = ROOT / "var" / "bench" / "litellm-venv"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 16}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1, headers=headers).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def spawn(args: list[str], env: dict[str, str] | None = None, log: Path | None = None, clean: bool = False) -> Any:
    """``clean``: only PATH/HOME from here (LiteLLM would take the console's DATABASE_URL for its own)."""
    out = log.open("w") if log else subprocess.DEVNULL
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ} if clean else dict(os.environ)
    return subprocess.Popen(args, cwd=ROOT, env={**base, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def setup(work: Path) -> dict[str, str]:
    return console(work, redis_db=10)


def tenant(port: int, replica_key: str, departments: dict[str, str], extra_args: list[str] | None = None) -> dict:
    """A deployment 'tiny' with one ready replica on ``port`` and one key per department."""
    from models_catalog.models import LocalModel
    from provisioning.models import Deployment, EngineRuntime, Replica
    from tenancy.models import ApiKey, Department

    Deployment.objects.all().delete()
    Department.objects.all().delete()
    model, _ = LocalModel.objects.get_or_create(repo_id="bench/tiny", defaults={"node": "benchnode", "status": "ready"})
    runtime, _ = EngineRuntime.objects.get_or_create(node="benchnode", name="bench", defaults={"python_path": "-"})
    deployment = Deployment.objects.create(name="tiny", model=model, runtime=runtime, node="benchnode",
                                           extra_args=extra_args or [])  # fmt: skip
    replica = Replica(deployment=deployment, ordinal=0, node="benchnode", port=port, state="ready")
    replica.set_key(replica_key)
    replica.save()
    keys = {}
    for name, priority in departments.items():
        department = Department.objects.create(name=name, priority=priority)
        department.deployments.add(deployment)
        keys[name] = ApiKey.issue(department, "bench")[1]
    return keys


def start_gateway(env: dict[str, str], workers: int, extra: dict[str, str] | None = None) -> tuple[Any, str]:
    port = free_port()
    args = [str(ROOT / ".venv/bin/uvicorn"), "appliance.asgi:application", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--no-access-log", "--log-level", "warning"]  # fmt: skip
    process = spawn(args, {**env, **(extra or {})})
    wait_http(f"http://127.0.0.1:{port}/v1/models", 60)
    return process, f"http://127.0.0.1:{port}"


# -- load ------------------------------------------------------------------------------------------
def wrk(url: str, key: str, seconds: int = SECONDS, connections: int = 32) -> float:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(CHAT))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        "function response(status, headers, body)\n"
        '  if status ~= 200 then io.stderr:write("status " .. status .. "\\n") end\n'
        "end\n"
    )
    result = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                            capture_output=True, text=True, timeout=seconds + 60)  # fmt: skip
    script.unlink()
    failures = result.stderr.count("status ")
    if failures or "Non-2xx" in result.stdout:
        raise RuntimeError(f"{url}: {failures} non-200 answers\n{result.stdout}\n{result.stderr[:500]}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))


def sequential(url: str, key: str, n: int = 1000) -> list[float]:
    times = []
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for _ in range(50):
            client.post(url, json=CHAT)
        for _ in range(n):
            start = time.perf_counter()
            response = client.post(url, json=CHAT)
            times.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, response.text
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one(session: aiohttp.ClientSession, url: str, key: str, stream: bool, body: dict | None = None) -> float:
    """One request; returns its time to first token in ms (whole answer when not streaming)."""
    payload = dict(body or CHAT, stream=stream)
    start = time.perf_counter()
    async with session.post(url, json=payload, headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {await response.text()}")
        first = None
        async for chunk in response.content.iter_any():
            if first is None and (not stream or b'"content"' in chunk or b'"text"' in chunk):
                first = time.perf_counter()
        return ((first or time.perf_counter()) - start) * 1000


async def closed_loop(url: str, key: str, stream: bool, concurrency: int, seconds: float) -> tuple[float, list]:
    ttfts: list[float] = []
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def worker() -> None:
            while time.monotonic() < deadline:
                ttfts.append(await one(session, url, key, stream))

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(ttfts) / (time.monotonic() - start), ttfts


# -- LiteLLM ---------------------------------------------------------------------------------------
def litellm(mock_url: str, replica_key: str, work: Path) -> tuple[Any, str, str]:
    if not (LITELLM_VENV / "bin" / "litellm").exists():
        print("installing litellm[proxy] into var/bench/litellm-venv (first run only)…", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin/pip"), "install", "-q", "litellm[proxy]"], check=True)
    master = "sk-" + secrets.token_urlsafe(32)
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n  - model_name: tiny\n    litellm_params:\n      model: openai/tiny\n"
        f"      api_base: {mock_url}/v1\n      api_key: {replica_key}\n"
        f"general_settings:\n  master_key: {master}\n"
    )
    port = free_port()
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    process = spawn([str(LITELLM_VENV / "bin/litellm"), "--config", str(config), "--port", str(port),
                     "--num_workers", "2"], env, work / "litellm.log", clean=True)  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", 180)
    return process, f"http://127.0.0.1:{port}", master


# -- parts -----------------------------------------------------------------------------------------
def part_a(env: dict[str, str], work: Path) -> tuple[list, dict]:
    mock_port, mock_key = free_port(), "mock-" + secrets.token_hex(8)
    mock = spawn([sys.executable, "-m", "tests.gateway.fake_engine", "--port", str(mock_port), "--key", mock_key])
    mock_url = f"http://127.0.0.1:{mock_port}"
    wait_http(mock_url + "/health", 30)
    keys = tenant(mock_port, mock_key, {"Legal": "normal"})
    rows, figures = [], {}
    try:
        direct_url = mock_url + "/v1/chat/completions"
        direct_rps, direct_lat = wrk(direct_url, mock_key), sequential(direct_url, mock_key)
        gateway, gateway_url = start_gateway(env, workers=2)
        try:
            url = gateway_url + "/v1/chat/completions"
            ours_rps, ours_lat = wrk(url, keys["Legal"]), sequential(url, keys["Legal"])
        finally:
            stop(gateway)
        proxy, proxy_url, master = litellm(mock_url, mock_key, work)
        try:
            url = proxy_url + "/v1/chat/completions"
            lite_rps, lite_lat = wrk(url, master), sequential(url, master, n=500)
        finally:
            stop(proxy)
    finally:
        stop(mock)
    base50, base99 = pct(direct_lat, 0.5), pct(direct_lat, 0.99)
    for name, rps, lat in (("mock, direct (the limit)", direct_rps, direct_lat),
                           ("our gateway, 2 workers", ours_rps, ours_lat),
                           ("LiteLLM proxy, 2 workers", lite_rps, lite_lat)):  # fmt: skip
        rows.append([f"(a) {name}", f"{rps:,.0f} req/s", f"{pct(lat, 0.5):.2f} / {pct(lat, 0.99):.2f} ms",
                     f"+{pct(lat, 0.5) - base50:.2f} / +{pct(lat, 0.99) - base99:.2f} ms"])  # fmt: skip
    figures.update(rps_vs_litellm=round(ours_rps / lite_rps, 1), gateway_rps=round(ours_rps),
                   litellm_rps=round(lite_rps), direct_rps=round(direct_rps),
                   overhead_p50_ms=round(pct(ours_lat, 0.5) - base50, 3),
                   overhead_p99_ms=round(pct(ours_lat, 0.99) - base99, 3),
                   litellm_overhead_p50_ms=round(pct(lite_lat, 0.5) - base50, 3))  # fmt: skip
    return rows, figures


VALIDATE = """
import statistics, sys, time, orjson, django
django.setup()
from gateway import admission
body = orjson.dumps(%r)
def median_us(call, rounds=31, n=2000):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            call(body)
        times.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(times)
print(median_us(lambda b: admission.parse("chat/completions", b)), median_us(orjson.loads))
"""


def part_v(env: dict[str, str]) -> tuple[list, dict]:
    """Parse + validate cost, in a process of its own with the console's settings."""
    done = subprocess.run([sys.executable, "-c", VALIDATE % CHAT], env=env, cwd=ROOT, capture_output=True,
                          text=True, check=True)  # fmt: skip
    ours, bare = (float(x) for x in done.stdout.split())
    rows = [["(v) parse + validate a chat request (msgspec)", "", f"{ours:.1f} µs", f"+{ours - bare:.1f} µs"],
            ["(v) orjson.loads only, no checks", "", f"{bare:.1f} µs", ""]]  # fmt: skip
    return rows, {"validate_us": round(ours, 2), "json_loads_us": round(bare, 2)}


def start_engine(extra: list[str]) -> tuple[Any, int, str]:
    python, model = engine_and_tiny_model()
    port, key = free_port(), "engine-" + secrets.token_hex(8)
    args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
            "tiny", "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", "0.15",
            "--max-model-len", "512", "--max-num-seqs", "32", *extra]  # fmt: skip
    # The CPU engine's OpenMP threads spin on the cores they are bound to: on a 2-core box they would
    # starve whatever else runs there (the gateway, the load generator), which a GPU box never sees.
    # So the engine gets core 0 and everything else core 1, for the direct runs and the gateway alike.
    env = {"VLLM_API_KEY": key, "VLLM_CPU_OMP_THREADS_BIND": "0"}
    process = spawn(["taskset", "-c", "0", *args], env, Path(tempfile.gettempdir()) / "bench-gateway-engine.log")
    os.sched_setaffinity(0, {1})  # this process (the load) and the gateways it starts from now on
    wait_http(f"http://127.0.0.1:{port}/health", 300)
    return process, port, key


def part_b(env: dict[str, str]) -> tuple[list, dict]:
    engine, port, key = start_engine([])
    rows, figures = [], {}
    try:
        keys = tenant(port, key, {"Legal": "normal"})
        gateway, gateway_url = start_gateway(env, workers=1)
        targets = {"direct": (f"http://127.0.0.1:{port}", key), "gateway": (gateway_url, keys["Legal"])}
        try:
            results: dict[tuple[str, bool], list] = {}
            for stream in (False, True):
                for url, auth in targets.values():  # warm-up
                    asyncio.run(closed_loop(url + "/v1/chat/completions", auth, stream, 32, 3))
                for _round in range(2):  # alternated, so drift on a shared machine hits both alike
                    for name, (url, auth) in targets.items():
                        rps, ttfts = asyncio.run(closed_loop(url + "/v1/chat/completions", auth, stream, 32,
                                                             SECONDS / 2))  # fmt: skip
                        results.setdefault((name, stream), []).append((rps, ttfts))
        finally:
            stop(gateway)
    finally:
        stop(engine)
    for stream in (False, True):
        direct, through = results[("direct", stream)], results[("gateway", stream)]
        d_rps, g_rps = statistics.mean(r for r, _ in direct), statistics.mean(r for r, _ in through)
        d_t = statistics.median([t for _, ts in direct for t in ts])
        g_t = statistics.median([t for _, ts in through for t in ts])
        kind = "streaming, TTFT" if stream else "non-streaming, latency"
        rows.append([f"(b) vLLM {kind}: direct / gateway", f"{d_rps:,.0f} / {g_rps:,.0f} req/s",
                     f"{d_t:.1f} / {g_t:.1f} ms", f"x{g_rps / d_rps:.2f} throughput, {g_t - d_t:+.1f} ms"])  # fmt: skip
        label = "stream" if stream else "nonstream"
        figures[f"vllm_{label}_ratio"] = round(g_rps / d_rps, 3)
        figures[f"vllm_{label}_added_{'ttft' if stream else 'latency'}_p50_ms"] = round(g_t - d_t, 2)
    return rows, figures


async def timed(session: aiohttp.ClientSession, url: str, key: str) -> tuple[float, bool]:
    """One streamed request: (ms to its first token, answered). A refusal (429) counts as answered
    never: its time is how long it waited to be refused."""
    start = time.perf_counter()
    try:
        return await one(session, url, key, True), True
    except RuntimeError as exc:
        if not str(exc).startswith("429"):
            raise
        return (time.perf_counter() - start) * 1000, False


async def load(url: str, keys: dict, burst: bool, seconds: float) -> dict[str, Any]:
    """High at HIGH_RATE and low at LOW_RATE (x10 when ``burst``), open loop, for ``seconds``: the high
    department's times to first token, refusals, and how many answers per second came back in all."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:  # fmt: skip
        started = time.monotonic()
        tasks: dict[str, list] = {"high": [], "low": []}

        async def send(name: str, rate: float) -> None:
            for i in range(int(rate * seconds)):
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
                tasks[name].append(asyncio.ensure_future(timed(session, url, keys[name])))

        await asyncio.gather(send("high", HIGH_RATE), send("low", LOW_RATE * (10 if burst else 1)))
        high = await asyncio.gather(*tasks["high"])
        low = await asyncio.gather(*tasks["low"])
        elapsed = time.monotonic() - started
    answered = sum(ok for _ms, ok in high + low)
    return {
        "high": [ms for ms, _ok in high],
        "refused": len(high) + len(low) - answered,
        "high_refused": sum(not ok for _ms, ok in high),
        "throughput": answered / elapsed,
    }


def scrape_ms(port: int, key: str) -> float:
    """Median time of one scrape of the engine's /metrics, parsed (what the worker does per replica)."""
    from provisioning.engine_metrics import scrape

    times = []
    for _ in range(21):
        start = time.perf_counter()
        scrape(port, key)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def learned_safe() -> str:
    """The gateway's learned safe concurrency for the bench's deployment, as a table note."""
    import redis

    from provisioning.models import Deployment

    pk = Deployment.objects.get(name="tiny").pk
    found = redis.Redis.from_url(os.environ["REDIS_URL"]).hget(f"{{gate:{pk}}}:ctl", "safe")
    return f", safe {float(found):.1f}" if found else ""


def part_c(env: dict[str, str]) -> tuple[list, dict]:
    """RUNS runs, each measuring FIFO and priority on the same engine (vLLM with its priority
    scheduling; FIFO: both departments one class, so neither the gateway nor vLLM orders them)."""
    engine, port, key = start_engine(["--scheduling-policy", "priority"])
    rows, ratios, throughputs = [], {"fifo": [], "priority": []}, []
    seconds = 2 * SECONDS  # 200 high-priority requests per phase at 10/s: enough for a p99
    try:
        figures = {"scrape_ms": round(scrape_ms(port, key), 2)}
        for run in range(RUNS):
            measured = {}
            for mode in ("fifo", "priority"):
                classes = {"high": "high", "low": "low"} if mode == "priority" else {"high": "normal", "low": "normal"}
                extra = ["--scheduling-policy", "priority"] if mode == "priority" else []
                keys = tenant(port, key, {"Research": classes["high"], "Marketing": classes["low"]}, extra)
                keys = {"high": keys["Research"], "low": keys["Marketing"]}
                gateway, gateway_url = start_gateway(env, workers=1, extra={
                    "GATEWAY_REPLICA_CAPACITY": "32", "GATEWAY_QUEUE_SECONDS": "5",
                    "GATEWAY_MAX_QUEUE": "128"})  # fmt: skip
                url = gateway_url + "/v1/chat/completions"
                try:
                    asyncio.run(load(url, keys, False, 5))  # warm-up: connections, and the gate learns
                    calm, burst = (
                        asyncio.run(load(url, keys, False, seconds)),
                        asyncio.run(load(url, keys, True, seconds)),
                    )
                finally:
                    stop(gateway)
                ratio = pct(burst["high"], 0.99) / pct(calm["high"], 0.99)
                safe = learned_safe()
                ratios[mode].append(ratio)
                measured[mode] = burst["throughput"]
                rows.append([f"(c) run {run + 1}, {mode}: high dept TTFT p99, calm / low bursting 10x",
                             f"{burst['throughput']:.1f} answers/s, {burst['refused']} refused "
                             f"({burst['high_refused']} high){safe}",
                             f"{pct(calm['high'], 0.99):.0f} / {pct(burst['high'], 0.99):.0f} ms",
                             f"x{ratio:.2f}"])  # fmt: skip
            throughputs.append(measured["priority"] / measured["fifo"])
    finally:
        stop(engine)
    figures |= {
        "priority_p99_ratio_worst": round(max(ratios["priority"]), 2),
        "fifo_p99_ratio_best": round(min(ratios["fifo"]), 2),
        "priority_throughput_vs_fifo": round(min(throughputs), 3),
    }
    rows.append(["(c) worst of the runs: priority TTFT ratio / best FIFO ratio / throughput vs FIFO", "",
                 f"x{figures['priority_p99_ratio_worst']:.2f} / x{figures['fifo_p99_ratio_best']:.2f}",
                 f"x{figures['priority_throughput_vs_fifo']:.2f}"])  # fmt: skip
    rows.append(["(c) one scrape of the engine's /metrics, parsed", "", f"{figures['scrape_ms']:.1f} ms", ""])
    return rows, figures


def main() -> None:
    if "a" in PARTS:
        need("wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    env = setup(work)
    rows, figures = [], {}
    try:
        for name, part in (("a", lambda: part_a(env, work)), ("v", lambda: part_v(env)), ("b", lambda: part_b(env)),
                           ("c", lambda: part_c(env))):  # fmt: skip
            if name in PARTS:
                part_rows, part_figures = part()
                rows += part_rows
                figures.update(part_figures)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = ["case", "throughput", "latency p50 / p99 (b, c: TTFT)", "added / ratio"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
