"""Downsampling (raw → minute → hour) and retention of GPU samples (appliance.rollup does the work)."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Avg, Max, Sum

from appliance import rollup as samples
from gpus.models import GpuSample

R = GpuSample.Resolution


def rollup(now: datetime | None = None) -> dict[str, int]:
    """Aggregate every complete bucket not yet aggregated. Averages for gauges; for counters and
    flags the bucket's maximum (the throttle bitmask's maximum shows that it throttled, not every
    reason); XIDs summed."""
    aggregates = {
        "util_gpu": Avg("util_gpu"), "mem_used": Avg("mem_used"), "temperature": Avg("temperature"),
        "power_draw": Avg("power_draw"), "sm_clock": Avg("sm_clock"), "throttle_reasons": Max("throttle_reasons"),
        "pcie_replay": Max("pcie_replay"), "ecc_dbe_volatile": Max("ecc_dbe_volatile"), "xid_count": Sum("xid_count"),
    }  # fmt: skip

    def make(bucket: dict) -> dict:
        used = bucket["mem_used"]
        return {**bucket, "mem_used": int(used) if used is not None else None, "xid_count": bucket["xid_count"] or 0}

    return samples.rollup(GpuSample, ["gpu_id"], aggregates, make, now)


def prune(now: datetime | None = None) -> dict[str, int]:
    """Delete samples older than their resolution's retention."""
    return samples.prune(GpuSample, {
        R.RAW: timedelta(hours=settings.GPU_RETENTION_RAW_HOURS),
        R.MINUTE: timedelta(days=settings.GPU_RETENTION_MINUTE_DAYS),
        R.HOUR: timedelta(days=settings.GPU_RETENTION_HOUR_DAYS),
    }, now)  # fmt: skip
