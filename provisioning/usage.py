"""What the model catalog asks before deleting a model: which deployments use it."""

from __future__ import annotations

from typing import Any

from provisioning.models import Deployment


def deployments_using(model: Any) -> list[str]:
    """Deployments of ``model`` that are not deleted, running or not (a stopped one would be left
    pointing at files that are gone). Deleted ones kept for past bills (archived) do not count: the
    model's row is archived with them."""
    names = Deployment.objects.filter(model=model).values_list("name", flat=True)
    return [f"deployment {name}" for name in sorted(names)]


def node_workload(nodes: list[str]) -> dict[str, list[str]]:
    """What runs on each node, for the Nodes page: its replicas that are not stopped."""
    from provisioning.models import Replica

    found: dict[str, list[str]] = {}
    replicas = Replica.objects.filter(node__in=nodes).exclude(state__in=list(Replica.TERMINAL))
    for replica in replicas.select_related("deployment").order_by("deployment__name", "ordinal"):
        found.setdefault(replica.node, []).append(f"{replica} ({replica.get_state_display()})")
    return found


def node_runtimes(node: str) -> dict[str, list[str]]:
    """The engine runtimes of a node, as it reports them at each heartbeat."""
    from provisioning.models import EngineRuntime

    runtimes = EngineRuntime.objects.filter(node=node).order_by("name")
    return {"runtimes": [f"{r.name} {r.version or '?'} ({r.status})" for r in runtimes]}


def replicas_lost(node: Any) -> int:
    """A node stopped reporting: its replicas are lost (the gateway sends them nothing from the next
    directory refresh, within a second) until the node is back and its reconcile pass adopts them."""
    from django.utils import timezone

    from provisioning.models import Replica

    message = (f"The node {node.name} stopped reporting at {timezone.now():%Y-%m-%d %H:%M:%S %Z}: this replica is "
               "lost until the node is back.")  # fmt: skip
    active = Replica.objects.filter(node=node.name).exclude(state__in=[*Replica.TERMINAL, Replica.State.LOST])
    return active.update(state=Replica.State.LOST, last_error=message)


def gpu_users(node: str | None) -> list[Any]:
    """The replicas that run (or are being stopped) on ``node`` (every node: None), for the GPU pages
    and the SIMULATED GPU source (``gpus.users``)."""
    from django.urls import reverse

    from gpus.users import GpuUser
    from provisioning.models import Replica

    replicas = Replica.objects.exclude(state__in=list(Replica.TERMINAL))
    if node is not None:
        replicas = replicas.filter(node=node)
    return [
        GpuUser(node=r.node, pid=r.pid, label=str(r), url=reverse("provisioning:detail", args=[r.deployment.name]),
                state=r.get_state_display(), gpus=list(r.gpu_ids or []), slot=r.ordinal,
                memory_fraction=r.deployment.gpu_memory_fraction, running=r.state in Replica.RUNNING)
        for r in replicas.select_related("deployment")
    ]  # fmt: skip
