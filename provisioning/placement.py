"""Choosing where a replica runs: GPUs with room for the model's estimate on healthy GPUs, or, on
a box without GPUs (the CPU runtime), enough system memory. Refusals name what did not fit.

The box must take new replicas (ready, not draining); a pinned deployment's box must hold the
model's files (``models_catalog.copies``), while a deployment placed on any box has the model copied
to the box chosen (``provisioning.scheduler``). Memory of another box is what its worker last
reported. Every function takes the box to look at (default: the deployment's)."""

from __future__ import annotations

from django.conf import settings
from django.utils.translation import gettext as _

from appliance.host import meminfo
from gpus.models import Gpu
from models_catalog.memory import estimate
from nodes.models import Node
from provisioning.models import Deployment, Replica

GiB = 1024**3
# Resident memory of a vLLM CPU engine besides weights and KV cache (ENGINE_NOTES.md: about 2 GB).
CPU_ENGINE_OVERHEAD = 2 * GiB


class PlacementRefused(Exception):
    """The replica does not fit; the message says what is missing."""


def memory_need(deployment: Deployment) -> int:
    """Bytes the model needs: weights plus the KV cache of one full-length sequence."""
    facts = deployment.model.facts()
    context = deployment.max_model_len or facts.get("context_length") or 4096
    try:
        return estimate(facts, context, 1)["total_bytes"]
    except ValueError as exc:
        raise PlacementRefused(
            _("Cannot size %(model)s: %(reason)s") % {"model": deployment.model, "reason": exc}
        ) from None


def cpu_memory(deployment: Deployment, need: int, node: str | None = None) -> tuple[int, int, int]:
    """(wanted, available, total) bytes of this box's memory for one more replica on the CPU engine:
    the model, the KV cache (the memory fraction of the total) and the engine's own; what is
    available after the replicas still starting, which have not taken theirs yet."""
    node = node or deployment.node
    info = meminfo() if node == settings.NODE_NAME else _reported_memory(node)
    kv_space = int(deployment.gpu_memory_fraction * info["MemTotal"])
    # Replicas still starting have not taken their memory yet: count them as taken.
    starting = Replica.objects.filter(node=node, state__in=[Replica.State.STARTING, Replica.State.PLACING])
    reserved = sum(
        int(r.deployment.gpu_memory_fraction * info["MemTotal"]) + CPU_ENGINE_OVERHEAD
        for r in starting.select_related("deployment")
    )
    wanted = need + kv_space + CPU_ENGINE_OVERHEAD
    return wanted, info["MemAvailable"] - reserved, info["MemTotal"]


def _reported_memory(node: str) -> dict[str, int]:
    row = Node.objects.filter(name=node).first()
    if row is None:
        return {"MemTotal": 0, "MemAvailable": 0}
    return {"MemTotal": row.memory_bytes, "MemAvailable": int(row.facts.get("memory_available_bytes") or 0)}


def check_box(name: str) -> None:
    """The box takes new replicas (else PlacementRefused)."""
    node = Node.objects.filter(name=name).first()
    if node is not None and node.state == Node.State.UNREACHABLE:
        raise PlacementRefused(_("%(node)s is unreachable: it takes no new replicas.") % {"node": node.name})
    if node is not None and node.draining:
        raise PlacementRefused(_("%(node)s is draining: it takes no new replicas.") % {"node": node.name})


def check_node(deployment: Deployment, node: str | None = None) -> None:
    """The box takes new replicas and has the model's files (else PlacementRefused)."""
    node = node or deployment.node
    check_box(node)
    model = deployment.model
    if not model.held_on(node):
        raise PlacementRefused(
            _("%(model)s is on %(model_node)s, not on %(node)s: download or import it on %(node)s first, or "
              "deploy it on any box (the model is then copied to the box chosen).")
            % {"model": model.repo_id, "model_node": model.node, "node": node}
        )  # fmt: skip


def place_cpu(deployment: Deployment, need: int, node: str | None = None) -> list[int]:
    node = node or deployment.node
    wanted, available, _total = cpu_memory(deployment, need, node)
    if wanted > available:
        raise PlacementRefused(
            _("Not enough memory on %(node)s: the model and its KV cache need about %(wanted).1f GiB (memory "
              "fraction %(fraction)g), %(available).1f GiB are available.")
            % {"node": node, "wanted": wanted / GiB, "fraction": deployment.gpu_memory_fraction,
               "available": max(available, 0) / GiB}
        )  # fmt: skip
    return []


def claimed_fractions(node: str) -> dict[int, float]:
    """Memory fraction of each GPU already promised to running replicas."""
    claimed: dict[int, float] = {}
    active = Replica.objects.filter(node=node).exclude(state__in=list(Replica.TERMINAL)).select_related("deployment")
    for replica in active:
        for gpu in replica.gpu_ids:
            claimed[gpu] = claimed.get(gpu, 0.0) + replica.deployment.gpu_memory_fraction
    return claimed


def place_gpus(deployment: Deployment, need: int, node: str | None = None) -> list[int]:
    node = node or deployment.node
    gpus = {gpu.index: gpu for gpu in Gpu.objects.filter(node=node)}
    count = deployment.tensor_parallel
    if count > len(gpus):
        raise PlacementRefused(_("The deployment needs %(count)s GPUs; %(node)s has %(have)s.")
                               % {"count": count, "node": node, "have": len(gpus)})  # fmt: skip
    # GPUs ticked in the form are those of the deployment's own box.
    if deployment.gpu_ids and node == deployment.node:
        unknown = [i for i in deployment.gpu_ids if i not in gpus]
        if unknown:
            raise PlacementRefused(_("%(node)s has no GPU %(missing)s.")
                                   % {"node": node, "missing": ", ".join(map(str, unknown))})  # fmt: skip
        candidates = [gpus[i] for i in deployment.gpu_ids]
    else:
        candidates = list(gpus.values())
    claimed = claimed_fractions(node)
    per_gpu = need / count
    fitting, reasons = [], []
    for gpu in candidates:
        total = gpu.latest.get("mem_total") or 0
        used = gpu.latest.get("mem_used") or 0
        if not gpu.accepts_new_replicas:
            reasons.append(_("GPU %(index)s is %(health)s") % {"index": gpu.index,
                                                               "health": gpu.get_health_display().lower()})  # fmt: skip
        elif claimed.get(gpu.index, 0.0) + deployment.gpu_memory_fraction > 1.0 + 1e-9:
            reasons.append(_("GPU %(index)s has %(free).2f of its memory unclaimed")
                           % {"index": gpu.index, "free": 1 - claimed.get(gpu.index, 0.0)})  # fmt: skip
        elif per_gpu > deployment.gpu_memory_fraction * total:
            reasons.append(
                _("GPU %(index)s: a fraction of %(fraction)g is %(size).1f GiB, the model needs %(need).1f GiB")
                % {"index": gpu.index, "fraction": deployment.gpu_memory_fraction,
                   "size": deployment.gpu_memory_fraction * total / GiB, "need": per_gpu / GiB}
            )  # fmt: skip
        elif deployment.gpu_memory_fraction * total > total - used:
            reasons.append(
                _("GPU %(index)s has %(free).1f GiB free, the memory fraction asks for %(size).1f GiB")
                % {"index": gpu.index, "free": (total - used) / GiB,
                   "size": deployment.gpu_memory_fraction * total / GiB}
            )  # fmt: skip
        else:
            fitting.append(gpu)
    if len(fitting) < count:
        raise PlacementRefused(_("Needs %(count)s GPU(s) with %(size).1f GiB each: %(reasons)s")
                               % {"count": count, "size": per_gpu / GiB, "reasons": "; ".join(reasons)})  # fmt: skip
    fitting.sort(key=lambda g: (claimed.get(g.index, 0.0), g.latest.get("mem_used") or 0))
    return sorted(g.index for g in fitting[:count])


def room(deployment: Deployment, node: str | None = None) -> list[int]:
    """GPU indexes for one more replica of ``deployment`` on ``node`` if it has the room (empty on
    the CPU runtime); the model's files are not asked about."""
    check_box(node or deployment.node)
    need = memory_need(deployment)
    if deployment.runtime.is_cpu:
        return place_cpu(deployment, need, node)
    return place_gpus(deployment, need, node)


def place(deployment: Deployment, node: str | None = None) -> list[int]:
    """GPU indexes for one more replica of ``deployment`` on ``node`` (default: its own box), which
    must hold the model."""
    check_node(deployment, node)
    return room(deployment, node)
