"""The Overview page, its live health panel, and the usage entries set aside."""

from __future__ import annotations

from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from appliance import health
from appliance.models import AuditEvent
from appliance.roles import can, requires
from dashboard import firststeps
from gpus.summary import gpu_summary
from tenancy.models import SetAsideUsage


@require_GET
@requires("overview.view")
def overview(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "dashboard/overview.html",
        {
            "health": health.report(),
            "recent_events": AuditEvent.objects.visible_to(request.user)[:10],
            "gpu_summary": gpu_summary() if can(request.user, "gpu.view") else None,
            "counts": firststeps.counts(request.user),
            "first_steps": firststeps.first_steps(request.user),
            "busiest": firststeps.busiest(request.user),
            "nav": "overview",
        },
    )


@require_GET
@requires("overview.view")
def health_panel(request: HttpRequest) -> HttpResponse:
    """The health panel alone; the Overview page polls it so it stays current without a reload."""
    return render(request, "dashboard/_health.html", {"health": health.report()})


@require_GET
@requires("usage.set_aside.view")
def set_aside(request: HttpRequest) -> HttpResponse:
    """Usage entries the database refused (``tenancy.usage``), newest first, as they came."""
    page = Paginator(SetAsideUsage.objects.all(), 50).get_page(request.GET.get("page"))
    return render(request, "dashboard/set_aside.html", {"page": page, "nav": "overview"})
