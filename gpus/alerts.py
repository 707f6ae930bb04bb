"""Opening, deduplicating and resolving alerts from health findings; queuing webhook deliveries."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from gpus.health import Finding, worst
from gpus.models import Alert, Gpu, Health, Webhook, WebhookDelivery


def _payload(alert: Alert, event: str) -> dict[str, Any]:
    gpu = alert.gpu
    return {
        "event": event,
        "alert": {"id": alert.pk, "rule": alert.rule, "severity": alert.severity, "message": alert.message},
        "gpu": {"node": gpu.node, "index": gpu.index, "uuid": gpu.uuid, "name": gpu.name},
        "simulated": gpu.simulated,
        "opened_at": alert.opened_at.isoformat(),
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
    }


def notify(alert: Alert, event: str) -> None:
    """Queue one delivery of a GPU alert's event per enabled webhook."""
    deliver(_payload(alert, event), event, alert)


def deliver(payload: dict[str, Any], event: str, alert: Alert | None = None) -> None:
    """Queue one delivery of an alert event (``payload``, as the webhook receives it) per enabled
    webhook, sent after the transaction commits. Other apps' alerts come through here too."""
    from gpus.tasks import deliver_webhook

    for webhook in Webhook.objects.filter(enabled=True):
        delivery = WebhookDelivery.objects.create(webhook=webhook, alert=alert, event=event, payload=payload)
        transaction.on_commit(lambda pk=delivery.pk: deliver_webhook.delay(pk))


def sync_alerts(gpu: Gpu, findings: list[Finding]) -> Health:
    """Make the open alerts match the findings; returns the GPU's health (open latched alerts count)."""
    now = timezone.now()
    firing = {finding.rule: finding for finding in findings}
    open_alerts = {alert.rule: alert for alert in gpu.alerts.filter(resolved_at__isnull=True)}
    for rule, finding in firing.items():
        alert = open_alerts.get(rule)
        if alert is None:
            alert = Alert.objects.create(
                gpu=gpu, rule=rule, severity=finding.severity, message=finding.message, text=finding.text,
                params=finding.params, latched=finding.latched,
            )  # fmt: skip
            open_alerts[rule] = alert
            notify(alert, "opened")
        else:
            Alert.objects.filter(pk=alert.pk).update(
                last_seen_at=now, occurrences=alert.occurrences + 1, message=finding.message, text=finding.text,
                params=finding.params,
            )  # fmt: skip
    for rule, alert in list(open_alerts.items()):
        if rule not in firing and not alert.latched:
            alert.resolved_at = now
            alert.save(update_fields=["resolved_at"])
            notify(alert, "resolved")
            del open_alerts[rule]
    return worst(alert.severity for alert in open_alerts.values())


def acknowledge(alert: Alert, user: Any) -> None:
    """An admin has seen it: latched alerts (events, damage) resolve; level ones stay until clear."""
    alert.acknowledged_at = timezone.now()
    alert.acknowledged_by = user
    fields = ["acknowledged_at", "acknowledged_by"]
    if alert.latched and alert.resolved_at is None:
        alert.resolved_at = timezone.now()
        fields.append("resolved_at")
    alert.save(update_fields=fields)
    if "resolved_at" in fields:
        notify(alert, "resolved")
        remaining = alert.gpu.alerts.filter(resolved_at__isnull=True).values_list("severity", flat=True)
        Gpu.objects.filter(pk=alert.gpu_id).update(health=worst(remaining))
