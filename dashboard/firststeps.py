"""What the Overview counts, and the first steps it shows on a box that is not serving yet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import Count, Q
from django.urls import reverse
from django.utils.translation import gettext_lazy as _

from appliance.roles import can


@dataclass
class Step:
    title: Any
    done: bool
    url: str
    action: Any


def counts(user: Any) -> dict[str, Any]:
    """Models, deployments, departments and today's traffic, as far as ``user`` may see them."""
    from models_catalog.models import LocalModel
    from provisioning.models import Deployment, Replica
    from tenancy import reports
    from tenancy.models import Department

    out: dict[str, Any] = {}
    if can(user, "model.view"):
        models = LocalModel.objects.aggregate(
            ready=Count("pk", filter=Q(status__in=list(LocalModel.USABLE))), total=Count("pk")
        )
        out["models"] = models
    ids = list(Deployment.objects.visible_to(user).values_list("pk", flat=True))
    serving = Replica.objects.filter(deployment_id__in=ids, state=Replica.State.READY)
    out["deployments"] = {"total": len(ids), "serving": serving.values("deployment_id").distinct().count()}
    out["departments"] = Department.objects.visible_to(user).active().count()
    out["today"] = reports.totals(reports.scoped_rollups(user, reports.Range.last_days(1)))
    return out


def busiest(user: Any, count: int = 5) -> list[dict[str, Any]]:
    """The deployments ``user`` may see with the most tokens in 24 h, and every one past a target
    (``provisioning.targets``), busiest first."""
    from provisioning.models import Deployment, TargetAlert
    from tenancy.reports import tokens_by_model

    tokens = tokens_by_model(user)
    visible = {d.name: d for d in Deployment.objects.visible_to(user)}
    names_by_pk = {d.pk: name for name, d in visible.items()}
    past: dict[str, list[str]] = {}
    for alert in TargetAlert.objects.filter(resolved_at__isnull=True, deployment_id__in=list(names_by_pk)):
        past.setdefault(names_by_pk[alert.deployment_id], []).append(alert.label)
    names = sorted(visible, key=lambda n: -tokens.get(n, 0))
    chosen = [n for n in names if tokens.get(n)][:count] + [n for n in names if n in past]
    return [{"name": n, "tokens": tokens.get(n, 0), "past": past.get(n, [])} for n in dict.fromkeys(chosen)]


def first_steps(user: Any) -> list[Step]:
    """The way from a fresh box to a department calling a model; [] once it is all done (or for
    those who cannot take the steps)."""
    from models_catalog.models import LocalModel
    from provisioning.models import Deployment, EngineRuntime
    from tenancy.models import ApiKey, UsageRecord

    if not can(user, "deployment.manage"):
        return []
    steps = [
        Step(_("Add a model: download it from a hub or a peer appliance, or import a directory"),
             LocalModel.objects.filter(status__in=list(LocalModel.USABLE)).exists(),
             reverse("models_catalog:add"), _("Add a model")),
        Step(_("Install the engine (vLLM) on this box"), EngineRuntime.objects.filter(status="ready").exists(),
             reverse("provisioning:list"), _("Engines")),
        Step(_("Deploy the model with one click"), Deployment.objects.exists(),
             reverse("provisioning:deploy"), _("Deploy")),
        Step(_("Create a department and issue it an API key"), ApiKey.objects.exists(),
             reverse("tenancy:list"), _("Departments")),
        Step(_("Call the model with the key (OpenAI-compatible /v1)"), UsageRecord.objects.filter(status=200).exists(),
             reverse("tenancy:list"), _("See the key's snippet")),
    ]  # fmt: skip
    return [] if all(step.done for step in steps) else steps
