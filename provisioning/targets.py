"""A deployment's service targets, checked after each scrape of its engines (engine_metrics.collect).

A target is past when the latest samples of its replicas (the last ``TARGET_WINDOW_SECONDS``) show it
past: the worst p99 TTFT or inter-token latency of any replica, the requests waiting on all replicas
together, the fullest KV cache. Past targets open a TargetAlert (one open per target), seen again they
count occurrences, back within they resolve; each opening and resolving goes to the webhooks as GPU
alerts do (``gpus.alerts.deliver``), and ``/metrics`` exports them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from gpus.alerts import deliver
from provisioning.models import Deployment, EngineSample, TargetAlert

# target key (its Deployment field: TargetAlert.FIELDS): (how to reduce the window's samples, field of
# the samples, scale of the samples to the target's unit, the unit)
TARGETS: dict[str, tuple[str, str, float, str]] = {
    "ttft_p99": ("max", "ttft_p99", 1000.0, "ms"),
    "itl_p99": ("max", "itl_p99", 1000.0, "ms"),
    "waiting": ("sum_latest", "waiting", 1.0, ""),
    "kv_cache": ("max", "kv_cache", 100.0, "%"),
}
assert set(TARGETS) == set(TargetAlert.FIELDS)


def limits(deployment: Deployment) -> dict[str, float]:
    """The targets the deployment sets, by key."""
    return {key: float(getattr(deployment, field)) for key, field in TargetAlert.FIELDS.items()
            if getattr(deployment, field) is not None}  # fmt: skip


def observed(deployment: Deployment, now: Any = None) -> dict[str, float]:
    """The window's figures of the deployment, by target key (absent where no sample says)."""
    since = (now or timezone.now()) - timedelta(seconds=settings.TARGET_WINDOW_SECONDS)
    rows = EngineSample.objects.filter(deployment=deployment, resolution="raw", time__gte=since)
    found: dict[str, float] = {}
    for key, (how, column, scale, _unit) in TARGETS.items():
        if how == "max":
            value = rows.aggregate(worst=Max(column))["worst"]
        else:  # the latest sample of each replica, added up
            latest: dict[int, float] = {}
            for replica, value in rows.exclude(**{column: None}).order_by("time").values_list("replica_id", column):
                latest[replica] = value
            value = sum(latest.values()) if latest else None
        if value is not None:
            found[key] = value * scale
    return found


def _payload(alert: TargetAlert, event: str) -> dict[str, Any]:
    unit = TARGETS[alert.target][3]
    return {
        "event": event, "kind": "deployment_target",
        "alert": {"id": alert.pk, "rule": f"target_{alert.target}", "severity": "warning",
                  "message": f"{alert.deployment.name}: {alert.target} {alert.value:g}{unit} past its target "
                             f"{alert.limit:g}{unit}"},
        "deployment": {"id": alert.deployment_id, "name": alert.deployment.name, "node": alert.deployment.node},
        "opened_at": alert.opened_at.isoformat(),
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
    }  # fmt: skip


@transaction.atomic
def check(deployment: Deployment, now: Any = None) -> list[TargetAlert]:
    """Open, refresh or resolve the deployment's target alerts; returns those open now."""
    now = now or timezone.now()
    wanted, seen = limits(deployment), observed(deployment, now)
    past = {key: seen[key] for key, limit in wanted.items() if key in seen and seen[key] > limit}
    open_alerts = {a.target: a for a in deployment.target_alerts.select_for_update().filter(resolved_at__isnull=True)}
    for key, value in past.items():
        alert = open_alerts.get(key)
        if alert is None:
            alert = TargetAlert.objects.create(deployment=deployment, target=key, value=value, limit=wanted[key])
            open_alerts[key] = alert
            deliver(_payload(alert, "opened"), "opened")
        else:
            TargetAlert.objects.filter(pk=alert.pk).update(
                last_seen_at=now, occurrences=alert.occurrences + 1, value=max(alert.value, value), limit=wanted[key]
            )
    for key, alert in list(open_alerts.items()):
        if key not in past:  # back within, or the target was removed
            alert.resolved_at = now
            alert.save(update_fields=["resolved_at"])
            deliver(_payload(alert, "resolved"), "resolved")
            del open_alerts[key]
    return list(open_alerts.values())


def acknowledge_open(deployment: Deployment, user: Any) -> int:
    """Someone has seen the deployment's open target alerts (they stay open until it is within)."""
    return deployment.target_alerts.filter(resolved_at__isnull=True, acknowledged_at__isnull=True).update(
        acknowledged_at=timezone.now(), acknowledged_by=user
    )
