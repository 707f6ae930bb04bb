"""Pages of the Deployments section."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET


@login_required
@require_GET
def index(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "dashboard/section_pending.html",
        {
            "title": _("Deployments"),
            "purpose": _("Run models on vLLM with one click and keep them running."),
            "nav": "deployments",
        },
    )
