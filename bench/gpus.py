"""Benchmark: one GPU sample of 8 GPUs, and the GPUs page and its 30-day chart with 30 days of
history for 8 GPUs (SQLite, as `make run` uses by default).

Side by side: the 30-day chart read from the hourly roll-up (what the console does) versus the
same chart read from per-minute rows (what it would cost without the hourly roll-up).
Run: .venv/bin/python bench/gpus.py
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import console

REPEATS = 7


def setup(work: Path) -> None:
    console(work, redis_db=12, flush=False, ALLOWED_HOSTS="testserver")


def timed(call: object, repeats: int = REPEATS) -> float:
    """Median milliseconds of ``call()``."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()  # type: ignore[operator]
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def fill_history(minutes_for_30_days: bool) -> int:
    import random

    from django.utils import timezone

    from gpus.models import Gpu, GpuSample

    now = timezone.now().replace(microsecond=0)
    rng = random.Random(1)  # noqa: S311 - synthetic data
    rows = []
    plan = [
        (GpuSample.Resolution.RAW, timedelta(seconds=5), timedelta(hours=24)),
        (GpuSample.Resolution.MINUTE, timedelta(minutes=1), timedelta(days=30 if minutes_for_30_days else 7)),
        (GpuSample.Resolution.HOUR, timedelta(hours=1), timedelta(days=30)),
    ]
    total = 0
    for gpu in Gpu.objects.all():
        for resolution, step, span in plan:
            moment = now - span
            while moment < now:
                rows.append(
                    GpuSample(gpu=gpu, resolution=resolution, time=moment, util_gpu=rng.uniform(0, 100),
                              mem_used=rng.randint(0, 80) * 1024**3, temperature=rng.uniform(30, 80),
                              power_draw=rng.uniform(80, 700), sm_clock=1980, throttle_reasons=0, pcie_replay=0)
                )  # fmt: skip
                moment += step
                if len(rows) >= 20000:
                    GpuSample.objects.bulk_create(rows)
                    total += len(rows)
                    rows = []
    GpuSample.objects.bulk_create(rows)
    return total + len(rows)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-gpus-"))
    try:
        setup(work)
        from django.contrib.auth import get_user_model
        from django.test import Client

        from gpus.charts import series
        from gpus.collect import collect
        from gpus.models import GpuSample
        from gpus.probe import SimulatedProbe

        probe = SimulatedProbe(count=8)
        probe_ms = timed(probe.sample, 50)
        collect(probe, node="bench")
        sample_ms = timed(lambda: collect(probe, node="bench"), 20)

        GpuSample.objects.all().delete()
        rows = fill_history(minutes_for_30_days=True)
        user = get_user_model().objects.create_superuser("bench", password="x" * 20)
        client = Client()
        client.force_login(user)
        assert client.get("/gpus/").status_code == 200
        page_ms = timed(lambda: client.get("/gpus/"))
        chart_ms = timed(lambda: client.get("/gpus/chart?range=30d&metric=util_gpu"))
        points = sum(len(s["points"]) for s in series("30d", "util_gpu")["series"])

        from django.utils import timezone

        since = timezone.now() - timedelta(days=30)

        def from_minutes() -> int:
            return len(list(GpuSample.objects.filter(resolution="minute", time__gte=since)
                            .order_by("gpu_id", "time").values_list("gpu_id", "time", "util_gpu")))  # fmt: skip

        baseline_ms = timed(from_minutes, 3)
        chart_24h_ms = timed(lambda: client.get("/gpus/chart?range=24h&metric=util_gpu"))
        overview_ms = timed(lambda: client.get("/"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n8 simulated GPUs, {rows:,} history rows (30 days), SQLite, median of runs\n")
    print(f"| {'measurement':58} | {'ms':>8} |")
    print(f"| {'-' * 58} | {'-' * 7}:|")
    for label, value in [
        ("probe only: one sample of 8 GPUs", probe_ms),
        ("one collection: sample + store + health + alerts", sample_ms),
        ("GPUs page (server time)", page_ms),
        (f"30-day chart JSON from hourly roll-up ({points} points)", chart_ms),
        ("30-day chart rows read from minute rows (no roll-up)", baseline_ms),
        ("24-hour chart JSON (minute rows)", chart_24h_ms),
        ("Overview page with GPU summary", overview_ms),
    ]:
        print(f"| {label:58} | {value:8.1f} |")
    print(f"\ngoal: page and chart under 200 ms; roll-up speed-up {baseline_ms / chart_ms:.0f}x")
    print(json.dumps({"sample_ms": round(sample_ms, 2), "page_ms": round(page_ms, 2), "chart_ms": round(chart_ms, 2),
                      "probe_ms": round(probe_ms, 3), "chart_from_minutes_ms": round(baseline_ms, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
