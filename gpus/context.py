"""Template context for every page: the open GPU alerts behind the header's indicator."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from appliance.roles import can


def open_alerts(request: HttpRequest) -> dict[str, Any]:
    """``header_alerts`` (called by the template only where it is shown): ``{"count", "critical"}`` of
    the open alerts, for users who may see GPUs."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated or not can(user, "gpu.view"):
        return {}

    def summary() -> dict[str, Any]:
        from django.db.models import Count, Q

        from gpus.models import Alert, Health

        return Alert.objects.filter(resolved_at__isnull=True).aggregate(
            count=Count("pk"), critical=Count("pk", filter=Q(severity=Health.CRITICAL))
        )

    return {"header_alerts": summary}
