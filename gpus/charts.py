"""Chart data: one series per GPU for a metric over 1 h / 24 h / 7 d / 30 d, read from the
resolution that gives a few hundred to a few thousand points."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from gpus.models import Gpu, GpuSample

RANGES = {
    "1h": (timedelta(hours=1), GpuSample.Resolution.RAW),
    "24h": (timedelta(hours=24), GpuSample.Resolution.MINUTE),
    "7d": (timedelta(days=7), GpuSample.Resolution.HOUR),
    "30d": (timedelta(days=30), GpuSample.Resolution.HOUR),
}
METRICS = {
    "util_gpu": ("%", 1.0),
    "temperature": ("°C", 1.0),
    "power_draw": ("W", 1.0),
    "mem_used": ("GiB", 1 / 1024**3),
}


# The page's charts, in order: (metric, title).
CHARTS = [("util_gpu", _("Utilization")), ("mem_used", _("Memory used")), ("temperature", _("Temperature")),
          ("power_draw", _("Power"))]  # fmt: skip


def series(range_key: str, metric: str, gpu_id: int | None = None) -> dict[str, Any]:
    """``{"unit", "resolution", "series": [{"label", "points": [[epoch ms, value], …]}]}``: every GPU,
    or the one GPU ``gpu_id``."""
    if range_key not in RANGES or metric not in METRICS:
        raise ValueError("Unknown range or metric.")
    span, resolution = RANGES[range_key]
    unit, scale = METRICS[metric]
    since = timezone.now() - span
    gpus = {gpu.pk: gpu for gpu in (Gpu.objects.filter(pk=gpu_id) if gpu_id is not None else Gpu.objects.all())}
    if gpu_id is not None and not gpus:
        raise ValueError("Unknown GPU.")
    points: dict[int, list[list[float]]] = {pk: [] for pk in gpus}
    rows = (
        GpuSample.objects.filter(resolution=resolution, time__gte=since, gpu_id__in=list(gpus))
        .order_by("gpu_id", "time")
        .values_list("gpu_id", "time", metric)
    )
    for gpu_id, moment, value in rows.iterator(chunk_size=5000):
        if value is not None:
            points[gpu_id].append([int(moment.timestamp() * 1000), round(value * scale, 2)])
    return {
        "unit": unit,
        "resolution": resolution,
        "series": [{"label": f"{gpus[pk].node} GPU {gpus[pk].index}", "points": points[pk]} for pk in gpus],
    }
