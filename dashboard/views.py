"""The Overview page and its live health panel."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from appliance import health
from appliance.models import AuditEvent
from gpus.summary import gpu_summary


@login_required
@require_GET
def overview(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "dashboard/overview.html",
        {
            "health": health.report(),
            "recent_events": AuditEvent.objects.all()[:10],
            "gpu_summary": gpu_summary(),
            "nav": "overview",
        },
    )


@login_required
@require_GET
def health_panel(request: HttpRequest) -> HttpResponse:
    """The health panel alone; the Overview page polls it so it stays current without a reload."""
    return render(request, "dashboard/_health.html", {"health": health.report()})
