"""The GPUs pages (tiles, charts, processes, alerts, webhooks, a page per GPU)."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from appliance import audit
from appliance.roles import can, requires
from gpus.alerts import acknowledge
from gpus.charts import CHARTS, RANGES, series
from gpus.forms import WebhookForm
from gpus.models import Alert, Gpu, NodeProbe, Webhook, WebhookDelivery
from gpus.users import users


def _owners(gpus: list[Gpu]) -> None:
    """Name what runs behind each GPU process (matched by node and process group)."""
    replicas = {(user.node, user.pid): user.label for user in users() if user.pid is not None}
    for gpu in gpus:
        for process in gpu.latest.get("processes", []):
            process["owner"] = replicas.get((gpu.node, process.get("pgid"))) or replicas.get((gpu.node, process["pid"]))


def _reasons(gpus: list[Gpu]) -> None:
    """Why each GPU has its health, in the reader's language: its open alerts (latched ones stay after
    the condition that raised them has passed) and what the last sample found."""
    open_alerts: dict[int, list[str]] = {}
    for alert in Alert.objects.filter(resolved_at__isnull=True, gpu__in=gpus).order_by("opened_at"):
        open_alerts.setdefault(alert.gpu_id, []).append(alert.display_message)
    for gpu in gpus:
        shown = open_alerts.get(gpu.pk, [])
        gpu.shown_reasons = shown + [reason for reason in gpu.reasons if reason not in shown]


def _tiles_context() -> dict:
    gpus = list(Gpu.objects.all())
    _owners(gpus)
    _reasons(gpus)
    probes = list(NodeProbe.objects.all())
    return {
        "gpus": gpus,
        "probes": probes,
        "simulated": any(g.simulated for g in gpus) or any(p.simulated for p in probes),
    }


@require_GET
@requires("gpu.view")
def index(request: HttpRequest) -> HttpResponse:
    return _page(request)


def _page(request: HttpRequest, webhook_form: WebhookForm | None = None, status: int = 200) -> HttpResponse:
    context = _tiles_context()
    see_webhooks = can(request.user, "webhook.view")
    context.update(
        open_alerts=Alert.objects.filter(resolved_at__isnull=True).select_related("gpu", "acknowledged_by"),
        recent_alerts=Alert.objects.filter(resolved_at__isnull=False)
        .select_related("gpu", "acknowledged_by")
        .order_by("-resolved_at")[:20],  # newest first
        webhooks=Webhook.objects.all() if see_webhooks else [],
        deliveries=WebhookDelivery.objects.select_related("webhook")[:10] if see_webhooks else [],
        webhook_form=webhook_form or WebhookForm(),
        ranges=list(RANGES),
        charts=CHARTS,
        nav="gpus",
    )
    return render(request, "gpus/index.html", context, status=status)


@require_GET
@requires("gpu.view")
def tiles(request: HttpRequest) -> HttpResponse:
    return render(request, "gpus/_tiles.html", _tiles_context())


@require_GET
@requires("gpu.view")
def detail(request: HttpRequest, gpu_id: int) -> HttpResponse:
    """One GPU: its readings, processes and what runs on it, its history and its alerts."""
    gpu = get_object_or_404(Gpu, pk=gpu_id)
    _owners([gpu])
    _reasons([gpu])
    alerts = list(gpu.alerts.select_related("acknowledged_by").order_by("-opened_at")[:50])
    # Placed on it, or seen on it by the driver (a process of the replica's group).
    processes = gpu.latest.get("processes", [])
    pids = {p.get("pgid") for p in processes} | {p.get("pid") for p in processes}
    running = [user for user in users(gpu.node) if gpu.index in user.gpus or (user.pid and user.pid in pids)]
    return render(request, "gpus/detail.html", {
        "gpu": gpu, "probe": NodeProbe.objects.filter(node=gpu.node).first(), "running": running,
        "open_alerts": [a for a in alerts if a.is_open], "past_alerts": [a for a in alerts if not a.is_open],
        "ranges": list(RANGES), "charts": CHARTS, "gpu_pk": gpu.pk, "simulated": gpu.simulated, "nav": "gpus",
    })  # fmt: skip


@require_GET
@requires("gpu.view")
def chart(request: HttpRequest) -> JsonResponse:
    gpu = request.GET.get("gpu", "")
    try:
        data = series(request.GET.get("range", "1h"), request.GET.get("metric", "util_gpu"),
                      int(gpu) if gpu.isdigit() else None)  # fmt: skip
    except ValueError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse(data)


@require_POST
@requires("alert.acknowledge")
def alert_ack(request: HttpRequest, alert_id: int) -> HttpResponse:
    alert = get_object_or_404(Alert, pk=alert_id)
    acknowledge(alert, request.user)
    audit.record(request, "gpu_alert.acknowledge", alert.gpu, detail={"alert": alert.pk, "rule": alert.rule})
    if alert.resolved_at is not None:
        messages.success(request, _("Alert acknowledged and resolved: %(message)s")
                         % {"message": alert.display_message})  # fmt: skip
    else:
        messages.success(request, _("Alert acknowledged; it stays open until the condition clears: %(message)s")
                         % {"message": alert.display_message})  # fmt: skip
    back = request.POST.get("next", "")
    if back == reverse("gpus:detail", args=[alert.gpu_id]):
        return redirect(back)
    return redirect("gpus:list")


@require_POST
@requires("webhook.manage")
def webhook_create(request: HttpRequest) -> HttpResponse:
    form = WebhookForm(request.POST)
    if not form.is_valid():  # the page again, each error next to its field, what was typed kept
        return _page(request, webhook_form=form, status=400)
    webhook = form.save()
    audit.record(request, "webhook.create", webhook, detail={"url": webhook.url})
    messages.success(request, _("Webhook %(name)s added: alerts are sent to it from now on.") % {"name": webhook.name})
    return redirect("gpus:list")


@require_POST
@requires("webhook.manage")
def webhook_delete(request: HttpRequest, webhook_id: int) -> HttpResponse:
    webhook = get_object_or_404(Webhook, pk=webhook_id)
    audit.record(request, "webhook.delete", webhook)
    webhook.delete()
    messages.success(request, _("Webhook removed."))
    return redirect("gpus:list")
