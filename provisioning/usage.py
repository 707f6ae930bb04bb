"""What the model catalog asks before deleting a model: which deployments use it."""

from __future__ import annotations

from typing import Any

from provisioning.models import Deployment, Replica


def deployments_using(model: Any) -> list[str]:
    """Deployments of ``model`` that should run or still have a replica that is not stopped."""
    names = set(model.deployments.filter(desired=Deployment.Desired.RUNNING).values_list("name", flat=True))
    names |= set(
        Replica.objects.filter(deployment__model=model)
        .exclude(state__in=list(Replica.TERMINAL))
        .values_list("deployment__name", flat=True)
    )
    return [f"deployment {name}" for name in sorted(names)]
