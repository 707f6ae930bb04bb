"""Downsampling (raw → minute → hour) and retention of GPU samples."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Avg, Max, Min, Sum
from django.db.models.functions import TruncHour, TruncMinute
from django.utils import timezone

from gpus.models import GpuSample

R = GpuSample.Resolution
STEPS = [(R.RAW, R.MINUTE, TruncMinute, timedelta(minutes=1)), (R.MINUTE, R.HOUR, TruncHour, timedelta(hours=1))]


def _floor(moment: datetime, width: timedelta) -> datetime:
    seconds = int(width.total_seconds())
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, tz=moment.tzinfo)


def rollup(now: datetime | None = None) -> dict[str, int]:
    """Aggregate every complete bucket not yet aggregated. Averages for gauges; for counters and
    flags the bucket's maximum (the throttle bitmask's maximum shows that it throttled, not every
    reason); XIDs summed."""
    now = now or timezone.now()
    made: dict[str, int] = {}
    for source, target, trunc, width in STEPS:
        done_until = GpuSample.objects.filter(resolution=target).aggregate(last=Max("time"))["last"]
        start = done_until + width if done_until else None
        end = _floor(now, width)
        rows = GpuSample.objects.filter(resolution=source, time__lt=end)
        if start is not None:
            rows = rows.filter(time__gte=start)
        buckets = (
            rows.annotate(bucket=trunc("time"))
            .values("gpu_id", "bucket")
            .annotate(
                util_gpu=Avg("util_gpu"),
                mem_used=Avg("mem_used"),
                temperature=Avg("temperature"),
                power_draw=Avg("power_draw"),
                sm_clock=Avg("sm_clock"),
                throttle_reasons=Max("throttle_reasons"),
                pcie_replay=Max("pcie_replay"),
                ecc_dbe_volatile=Max("ecc_dbe_volatile"),
                xid_count=Sum("xid_count"),
                first=Min("time"),
            )
        )
        new = [
            GpuSample(
                gpu_id=b["gpu_id"],
                resolution=target,
                time=b["bucket"],
                util_gpu=b["util_gpu"],
                mem_used=int(b["mem_used"]) if b["mem_used"] is not None else None,
                temperature=b["temperature"],
                power_draw=b["power_draw"],
                sm_clock=b["sm_clock"],
                throttle_reasons=b["throttle_reasons"],
                pcie_replay=b["pcie_replay"],
                ecc_dbe_volatile=b["ecc_dbe_volatile"],
                xid_count=b["xid_count"] or 0,
            )
            for b in buckets
        ]
        GpuSample.objects.bulk_create(new, batch_size=1000)
        made[target] = len(new)
    return made


def prune(now: datetime | None = None) -> dict[str, int]:
    """Delete samples older than their resolution's retention."""
    now = now or timezone.now()
    keep = {
        R.RAW: timedelta(hours=settings.GPU_RETENTION_RAW_HOURS),
        R.MINUTE: timedelta(days=settings.GPU_RETENTION_MINUTE_DAYS),
        R.HOUR: timedelta(days=settings.GPU_RETENTION_HOUR_DAYS),
    }
    return {
        resolution: GpuSample.objects.filter(resolution=resolution, time__lt=now - age).delete()[0]
        for resolution, age in keep.items()
    }
