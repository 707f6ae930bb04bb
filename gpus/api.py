"""GPUs, their alerts and alert webhooks in the management API (``/api/v1/gpus``, ``/alerts``,
``/webhooks``): the GPUs page's twins, with the same rules (``appliance.roles``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import transaction
from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from ninja import Field, Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status

from appliance import audit
from appliance.api import require
from gpus.alerts import acknowledge
from gpus.forms import WebhookForm
from gpus.models import Alert, Gpu, Webhook

router = Router(tags=["gpus"])


class GpuOut(Schema):
    id: int
    node: str
    index: int
    uuid: str
    name: str
    simulated: bool
    health: str
    health_reasons: list[str] = Field(..., alias="english_reasons")
    last_seen: datetime


class AlertOut(Schema):
    id: int
    gpu_id: int
    rule: str
    severity: str
    message: str
    opened_at: datetime
    last_seen_at: datetime
    occurrences: int
    resolved_at: datetime | None
    acknowledged_at: datetime | None


class WebhookOut(Schema):
    id: int
    name: str
    url: str
    enabled: bool


class WebhookIn(Schema):
    name: str
    url: str


@router.get("/gpus", response=list[GpuOut], summary="GPUs of every node, with their health")
def list_gpus(request: HttpRequest) -> Any:
    require(request, "gpu.view")
    return Gpu.objects.all()


@router.get("/alerts", response=list[AlertOut], summary="GPU alerts, newest first")
def list_alerts(request: HttpRequest, open: bool | None = None) -> Any:
    require(request, "gpu.view")
    alerts = Alert.objects.order_by("-opened_at", "-pk")
    if open is not None:
        alerts = alerts.filter(resolved_at__isnull=open)
    return alerts[:500]


@router.post("/alerts/{alert_id}/acknowledge", response=AlertOut, summary="Acknowledge an alert")
def acknowledge_alert(request: HttpRequest, alert_id: int) -> Any:
    require(request, "alert.acknowledge", action="gpu_alert.acknowledge")
    alert = get_object_or_404(Alert.objects.select_related("gpu"), pk=alert_id)
    acknowledge(alert, request.user)
    audit.record(request, "gpu_alert.acknowledge", alert.gpu, detail={"alert": alert.pk, "rule": alert.rule,
                                                                      "via": "api"})  # fmt: skip
    return alert


@router.get("/webhooks", response=list[WebhookOut], summary="Alert webhooks (appliance admin)")
def list_webhooks(request: HttpRequest) -> Any:
    require(request, "webhook.view")
    return Webhook.objects.order_by("pk")


@router.post("/webhooks", response={201: WebhookOut}, summary="Add an alert webhook (appliance admin)")
def create_webhook(request: HttpRequest, payload: WebhookIn) -> Status:
    require(request, "webhook.manage", action="webhook.create")
    form = WebhookForm(payload.dict())
    if not form.is_valid():
        raise HttpError(422, "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
    with transaction.atomic():
        webhook = form.save()
        audit.record(request, "webhook.create", webhook, detail={"url": webhook.url, "via": "api"})
    return Status(201, webhook)


@router.delete("/webhooks/{webhook_id}", response={204: None}, summary="Remove an alert webhook (appliance admin)")
def delete_webhook(request: HttpRequest, webhook_id: int) -> Status:
    require(request, "webhook.manage", action="webhook.delete")
    webhook = get_object_or_404(Webhook, pk=webhook_id)
    with transaction.atomic():
        audit.record(request, "webhook.delete", webhook, detail={"via": "api"})
        webhook.delete()
    return Status(204, None)
