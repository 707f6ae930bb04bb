"""Choosing the box for each replica of a deployment placed on any box, and replacing replicas of a
lost box on the others.

A pinned deployment (the default) runs every replica on its own box (``Deployment.node``) and a
replica of a lost box waits for it (``reconcile`` adopts its engine when the box is back). For a
deployment with ``any_node``, this module, run by beat before each round of reconcile passes and at
once when a box is lost, owns the replica rows:

- a missing replica gets a row on the best box: ready, not draining, with a ready engine runtime of
  the deployment's package and room for the model (``placement.room``); among those, a box that
  holds the model first (no copy to wait for), then the one with fewest replicas of this
  deployment, then the most free memory;
- the chosen box without the model gets a copy (``models_catalog.copies``); the replica stays
  pending there until the copy is ready, and moves to another box if the copy fails;
- a replica on a draining box moves to another box that can take it;
- a lost replica moves to another box (a new row state, same ordinal): the gateway already stopped
  sending to it; when the lost box comes back its reconcile pass finds an engine nobody owns and
  stops it (``reconcile.stop_orphans``), so nothing runs twice;
- when no box can take a replica, the replica says why, box by box.

State lives in the database only: the next run starts from the rows, whatever the previous did.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import Count
from django.utils import timezone
from django.utils.translation import gettext as _

from appliance.worker import redis_client
from models_catalog.copies import copy_on, request_copy
from models_catalog.models import JobConflict, ModelCopy
from nodes.models import Node
from provisioning.models import Deployment, EngineRuntime, Replica, ReplicaPart
from provisioning.placement import PlacementRefused, place, room

logger = logging.getLogger(__name__)
S = Replica.State


def runtime_on(deployment: Deployment, node: str) -> EngineRuntime | None:
    """The engine runtime a replica of ``deployment`` uses on ``node``: its own on its own box, else a
    ready one of the same package there (the same version first)."""
    if node == deployment.runtime.node:
        return deployment.runtime
    found = EngineRuntime.objects.filter(node=node, package=deployment.runtime.package, status="ready")
    return sorted(found, key=lambda r: (r.version != deployment.runtime.version, r.name != deployment.runtime.name),
                  )[0] if found else None  # fmt: skip


def why_not(deployment: Deployment, node: Node) -> str | None:
    """Why ``node`` cannot take one more replica of ``deployment``, or None if it can."""
    if runtime_on(deployment, node.name) is None:
        return _("no ready %(package)s engine runtime") % {"package": deployment.runtime.package}
    copy = copy_on(deployment.model, node.name)
    if copy is not None and copy.status == ModelCopy.Status.FAILED:
        return _("copying the model there failed: %(error)s") % {"error": copy.error.splitlines()[0][:200]}
    try:
        room(deployment, node.name)
    except PlacementRefused as exc:
        return str(exc)
    return None


def ranked(deployment: Deployment, exclude: set[str] | frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Ready, undrained boxes that can take one more replica (or rank) of ``deployment``, best first
    (holding the model, then fewest replicas of it, then most free memory); and why each other box
    was passed over."""
    boxes = Node.objects.filter(state=Node.State.READY, draining=False).exclude(name__in=exclude)
    mine: dict[str, int] = {}
    if deployment.pk is not None:  # a deployment being made (the form's check) has none yet
        mine = dict(deployment.replica_set.exclude(state__in=[*Replica.TERMINAL, S.LOST])
                    .values_list("node").annotate(n=Count("pk")))  # fmt: skip
    fitting, reasons = [], []
    for node in boxes:
        reason = why_not(deployment, node)
        if reason is not None:
            reasons.append(f"{node.name}: {reason}")
            continue
        free = int(node.facts.get("memory_available_bytes") or 0)
        fitting.append((not deployment.model.held_on(node.name), mine.get(node.name, 0), -free, node.name))
    return [key[-1] for key in sorted(fitting)], reasons


def choose(deployment: Deployment, exclude: set[str] | frozenset[str] = frozenset()) -> tuple[str | None, list[str]]:
    """The best box for one more replica, and why each other box was passed over."""
    boxes, reasons = ranked(deployment, exclude)
    return (boxes[0] if boxes else None), reasons


def part_boxes(deployment: Deployment, rank0: str) -> tuple[list[str], list[str]]:
    """Distinct boxes for ranks 1.. of a replica over several boxes whose rank 0 runs on ``rank0``;
    fewer than wanted when there are not enough."""
    boxes, reasons = ranked(deployment, {rank0})
    return boxes[: deployment.nodes_per_replica - 1], reasons


def _boxes_passed_over(reasons: list[str]) -> str:
    """Why each box was passed over, in one line (or that there was none to pass over)."""
    return "; ".join(reasons) or _("no ready box")


def _nowhere(reasons: list[str]) -> str:
    return _("No box can take this replica now: %(reasons)s.") % {"reasons": _boxes_passed_over(reasons)}


def assign(replica: Replica, node: str, why: str) -> None:
    """Move a replica's row to ``node``, to be started there (and its model copied there first)."""
    fields: dict[str, Any] = dict(node=node, state=S.PENDING, pid=None, port=None, gpu_ids=[], key_sealed="",
                                  consecutive_crashes=0, next_start_at=None, started_at=None, ready_at=None,
                                  last_error=why)  # fmt: skip
    Replica.objects.filter(pk=replica.pk).update(**fields)
    ReplicaPart.objects.filter(replica=replica).delete()  # its other ranks are chosen again at launch
    _copy_if_needed(replica.deployment, node)
    from provisioning.tasks import reconcile_node

    # That box's pass now, not at the next round: a replacement's start is what a lost box costs.
    transaction.on_commit(lambda: reconcile_node.apply_async(queue=f"node.{node}", expires=30))


def _copy_if_needed(deployment: Deployment, node: str) -> None:
    if deployment.model.held_on(node):
        return
    try:
        request_copy(deployment.model, node)
    except JobConflict as exc:  # the model itself is not ready; the replica's launch says so
        logger.warning("no copy of %s to %s: %s", deployment.model, node, exc)


def schedule_deployment(deployment: Deployment, draining: frozenset[str] = frozenset()) -> list[str]:
    """Converge one any-box deployment's rows; returns what was done, in words. A replica on a box in
    ``draining`` moves to another box when one can take it (its old engine is then stopped by that
    box's pass: the replica is away while the new engine starts)."""
    done: list[str] = []
    have = {r.ordinal: r for r in deployment.replica_set.all()}
    for ordinal in range(deployment.replicas):
        replica = have.get(ordinal)
        if replica is None:  # a new replica waits, placing, on no box until one can take it
            replica = Replica.objects.create(deployment=deployment, ordinal=ordinal, node="", state=S.PLACING)
        if replica.state == S.STOPPED or (replica.state == S.PLACING and not replica.node):
            node, reasons = choose(deployment)
            if node is None:
                _note(replica, _nowhere(reasons), replace=True)
                continue
            assign(replica, node, _("Placed on %(node)s.") % {"node": node})
            done.append(f"{replica}: placed on {node}")
        elif replica.state == S.LOST or _copy_failed(replica):
            node, reasons = choose(deployment, exclude={replica.node})
            if node is None:
                _note(replica, _nowhere(reasons))
                continue
            why = (_("%(old)s was lost at %(at)s: replaced on %(node)s.") if replica.state == S.LOST
                   else _("The model could not be copied to %(old)s: placed on %(node)s instead."))  # fmt: skip
            assign(replica, node, why % {"old": replica.node, "node": node, "at": f"{timezone.now():%H:%M:%S}"})
            done.append(f"{replica}: moved from {replica.node} to {node}")
        elif replica.node in draining and replica.state not in Replica.TERMINAL:
            node, reasons = choose(deployment, exclude={replica.node})
            if node is None:
                _note(replica, _("%(old)s is draining, and no other box can take this replica now: %(reasons)s.")
                      % {"old": replica.node, "reasons": _boxes_passed_over(reasons)})  # fmt: skip
                continue
            assign(replica, node, _("%(old)s is draining: moved to %(node)s.") % {"old": replica.node, "node": node})
            done.append(f"{replica}: moved from draining {replica.node} to {node}")
    return done


def _note(replica: Replica, note: str, replace: bool = False) -> None:
    """Say on the replica why it waits (once: the same note is not appended again)."""
    if note in replica.last_error:
        return
    text = note if replace else f"{replica.last_error}\n{note}".strip()
    Replica.objects.filter(pk=replica.pk).update(last_error=text)


def _copy_failed(replica: Replica) -> bool:
    if replica.state not in (S.PENDING, S.PLACING):
        return False
    copy = copy_on(replica.deployment.model, replica.node)
    return copy is not None and copy.status == ModelCopy.Status.FAILED


def schedule(client: redis.Redis | None = None) -> dict[str, Any]:
    """One run over every running any-box deployment, under a Redis lock (beat and a node-loss hook
    may both call it)."""
    client = client or redis_client()
    lock = client.lock("console:schedule", timeout=60, blocking_timeout=10)
    if not lock.acquire():
        return {"skipped": "another scheduling run is running"}
    try:
        done: list[str] = []
        draining = frozenset(Node.objects.filter(draining=True).values_list("name", flat=True))
        running = Deployment.objects.filter(any_node=True, desired=Deployment.Desired.RUNNING)
        for deployment in running.select_related("model", "runtime"):
            done += schedule_deployment(deployment, draining)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass
    for line in done:
        logger.info("scheduler: %s", line)
    return {"done": done}


def check(deployment: Deployment) -> None:
    """Refuse at once (``PlacementRefused``) a new deployment that no box can run now: its own box
    for a pinned one, any box for one placed on any box."""
    if not deployment.any_node:
        place(deployment)
        node = deployment.node
    else:
        found, reasons = choose(deployment)
        if found is None:
            raise PlacementRefused(_nowhere(reasons))
        node = found
    if deployment.nodes_per_replica > 1:
        boxes, reasons = part_boxes(deployment, node)
        if len(boxes) < deployment.nodes_per_replica - 1:
            raise PlacementRefused(too_few_boxes(deployment, reasons))


def too_few_boxes(deployment: Deployment, reasons: list[str]) -> str:
    return _("One replica spans %(count)s boxes; there are not enough other boxes with room: %(reasons)s.") % {
        "count": deployment.nodes_per_replica, "reasons": "; ".join(reasons) or _("no other ready box")}  # fmt: skip


def replace_lost(node: Node) -> dict[str, Any]:
    """The node-loss hook (after ``usage.replicas_lost``): replacements at once, not at the next beat."""
    return schedule()


def nodes_with_work() -> set[str]:
    """Every box a reconcile pass must run on: those of deployments and of replicas not stopped."""
    names = set(Deployment.objects.values_list("node", flat=True))
    names |= set(Replica.objects.exclude(state__in=list(Replica.TERMINAL)).values_list("node", flat=True))
    return (names | {settings.NODE_NAME}) - {""}
