"""Downsampling (raw → minute → hour) and retention of time series kept in one table per kind
(GPU samples, engine samples): rows keyed by (series, resolution, time), with a ``Resolution``
choice of ``raw``, ``minute`` and ``hour``. Gauges are averaged, counters and flags take the
bucket's maximum; each kind says which by the aggregates it passes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.db import models
from django.db.models import Max, Min
from django.db.models.functions import TruncHour, TruncMinute
from django.utils import timezone


class Resolution(models.TextChoices):
    """The resolutions a sampled series is kept at (a model's ``resolution`` field's choices)."""

    RAW = "raw"
    MINUTE = "minute"
    HOUR = "hour"


RAW, MINUTE, HOUR = Resolution.RAW, Resolution.MINUTE, Resolution.HOUR
STEPS = [(RAW, MINUTE, TruncMinute, timedelta(minutes=1)), (MINUTE, HOUR, TruncHour, timedelta(hours=1))]


def _floor(moment: datetime, width: timedelta) -> datetime:
    seconds = int(width.total_seconds())
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, tz=moment.tzinfo)


def rollup(
    model: type[models.Model], keys: list[str], aggregates: dict[str, Any],
    make: Callable[[dict[str, Any]], dict[str, Any]] = dict, now: datetime | None = None,
) -> dict[str, int]:  # fmt: skip
    """Aggregate every complete bucket of ``model`` not yet aggregated, per series (``keys``).
    ``make`` turns one bucket's aggregates into the new row's fields (rounding, defaults)."""
    now = now or timezone.now()
    made: dict[str, int] = {}
    for source, target, trunc, width in STEPS:
        done_until = model.objects.filter(resolution=target).aggregate(last=Max("time"))["last"]
        rows = model.objects.filter(resolution=source, time__lt=_floor(now, width))
        if done_until is not None:
            rows = rows.filter(time__gte=done_until + width)
        buckets = rows.annotate(bucket=trunc("time")).values(*keys, "bucket").annotate(first=Min("time"), **aggregates)
        new = [
            model(**{key: b[key] for key in keys}, resolution=target, time=b["bucket"],
                  **make({name: b[name] for name in aggregates}))
            for b in buckets
        ]  # fmt: skip
        model.objects.bulk_create(new, batch_size=1000)
        made[target] = len(new)
    return made


def prune(model: type[models.Model], keep: dict[str, timedelta], now: datetime | None = None) -> dict[str, int]:
    """Delete rows older than their resolution's retention."""
    now = now or timezone.now()
    return {
        resolution: model.objects.filter(resolution=resolution, time__lt=now - age).delete()[0]
        for resolution, age in keep.items()
    }
