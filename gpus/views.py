"""The GPUs page (tiles, charts, processes, alerts, webhooks) and /metrics."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from appliance import audit
from appliance.roles import Role, require_role
from gateway import metrics as gateway_metrics
from gpus.alerts import acknowledge
from gpus.charts import METRICS, RANGES, series
from gpus.forms import WebhookForm
from gpus.metrics import GpuCollector
from gpus.models import Alert, Gpu, NodeProbe, Webhook, WebhookDelivery

admin_only = require_role(Role.APPLIANCE_ADMIN)


def _owners(gpus: list[Gpu]) -> None:
    """Name the deployment replica behind each GPU process (matched by node and process group)."""
    from provisioning.models import Replica

    replicas = {(r.node, r.pid): str(r) for r in Replica.objects.filter(pid__isnull=False).select_related("deployment")}
    for gpu in gpus:
        for process in gpu.latest.get("processes", []):
            process["owner"] = replicas.get((gpu.node, process.get("pgid"))) or replicas.get((gpu.node, process["pid"]))


def _tiles_context() -> dict:
    gpus = list(Gpu.objects.all())
    _owners(gpus)
    probes = list(NodeProbe.objects.all())
    return {
        "gpus": gpus,
        "probes": probes,
        "simulated": any(g.simulated for g in gpus) or any(p.simulated for p in probes),
    }


@login_required
@require_GET
def index(request: HttpRequest) -> HttpResponse:
    context = _tiles_context()
    context.update(
        open_alerts=Alert.objects.filter(resolved_at__isnull=True).select_related("gpu"),
        recent_alerts=Alert.objects.filter(resolved_at__isnull=False).select_related("gpu")[:20],
        webhooks=Webhook.objects.all(),
        deliveries=WebhookDelivery.objects.select_related("webhook")[:10],
        webhook_form=WebhookForm(),
        ranges=list(RANGES),
        metrics=list(METRICS),
        nav="gpus",
    )
    return render(request, "gpus/index.html", context)


@login_required
@require_GET
def tiles(request: HttpRequest) -> HttpResponse:
    return render(request, "gpus/_tiles.html", _tiles_context())


@login_required
@require_GET
def chart(request: HttpRequest) -> JsonResponse:
    try:
        data = series(request.GET.get("range", "1h"), request.GET.get("metric", "util_gpu"))
    except ValueError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse(data)


@require_POST
@admin_only
def alert_ack(request: HttpRequest, alert_id: int) -> HttpResponse:
    alert = get_object_or_404(Alert, pk=alert_id)
    acknowledge(alert, request.user)
    audit.record(request, "gpu_alert.acknowledge", alert.gpu, detail={"alert": alert.pk, "rule": alert.rule})
    return redirect("gpus:list")


@require_POST
@admin_only
def webhook_create(request: HttpRequest) -> HttpResponse:
    form = WebhookForm(request.POST)
    if not form.is_valid():
        messages.error(request, " ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
        return redirect("gpus:list")
    webhook = form.save()
    audit.record(request, "webhook.create", webhook, detail={"url": webhook.url})
    return redirect("gpus:list")


@require_POST
@admin_only
def webhook_delete(request: HttpRequest, webhook_id: int) -> HttpResponse:
    webhook = get_object_or_404(Webhook, pk=webhook_id)
    audit.record(request, "webhook.delete", webhook)
    webhook.delete()
    messages.success(request, _("Webhook removed."))
    return redirect("gpus:list")


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition; needs ``Authorization: Bearer <METRICS_TOKEN>``."""
    if not settings.METRICS_TOKEN:
        return HttpResponse("Metrics are off: set METRICS_TOKEN.\n", status=403, content_type="text/plain")
    sent = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(sent.encode(), settings.METRICS_TOKEN.encode()):
        return HttpResponse("A valid metrics token is required.\n", status=401, content_type="text/plain")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuCollector())
    body = generate_latest(registry) + generate_latest(gateway_metrics.REGISTRY)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
