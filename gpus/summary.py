"""The GPU health summary shown on the Overview page."""

from __future__ import annotations

from typing import Any

from django.db.models import Count

from gpus.models import Alert, Gpu, NodeProbe


def gpu_summary() -> dict[str, Any]:
    counts = dict(Gpu.objects.values_list("health").annotate(n=Count("id")))
    probes = list(NodeProbe.objects.all())
    return {
        "total": sum(counts.values()),
        "ok": counts.get("ok", 0),
        "warning": counts.get("warning", 0),
        "critical": counts.get("critical", 0),
        "unknown": counts.get("unknown", 0),
        "open_alerts": Alert.objects.filter(resolved_at__isnull=True).count(),
        "simulated": any(p.simulated for p in probes),
        "errors": [f"{p.node}: {p.error}" for p in probes if not p.ok],
    }
