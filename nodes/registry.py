"""Registering nodes, their heartbeats, noticing the ones that went away, and joining new ones.

Every box's worker calls ``heartbeat()`` every ``WORKER_HEARTBEAT_SECONDS`` (from its heartbeat
thread, ``appliance.worker``): the node row is created or refreshed with what the box has. Beat runs
``sweep()`` every few seconds: a node with no heartbeat for ``NODE_LOST_SECONDS`` becomes
unreachable, and the hooks registered with ``on_node_lost`` run (provisioning marks its replicas lost
there); a heartbeat from it makes it ready again and runs the ``on_node_back`` hooks.

Other apps add what a node reports with ``register_facts`` (GPUs, engine runtimes) and what runs on
it with ``register_workload``: this app knows nothing of GPUs or deployments.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from appliance.host import meminfo
from appliance.models import hash_token
from nodes.models import JOIN_TOKEN_PREFIX, JoinToken, Node

logger = logging.getLogger(__name__)

FactProvider = Callable[[str], dict[str, Any]]
NodeHook = Callable[[Node], Any]
Workload = Callable[[list[str]], dict[str, list[str]]]

_fact_providers: list[FactProvider] = []
_lost_hooks: list[NodeHook] = []
_back_hooks: list[NodeHook] = []
_workloads: list[Workload] = []


def register_facts(provider: FactProvider) -> None:
    """``provider(node name)`` adds to what a node reports at each heartbeat (run on that node)."""
    _fact_providers.append(provider)


def on_node_lost(hook: NodeHook) -> None:
    _lost_hooks.append(hook)


def on_node_back(hook: NodeHook) -> None:
    _back_hooks.append(hook)


def register_workload(workload: Workload) -> None:
    """``workload(node names)`` -> {node name: [what runs there, in words]} for the Nodes page and API."""
    _workloads.append(workload)


def workload(names: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {name: [] for name in names}
    for provider in _workloads:
        for name, items in provider(names).items():
            found.setdefault(name, []).extend(items)
    return found


def nodes_with_workload() -> list[Node]:
    """Every node, each with ``running``: what runs there, in words (the Nodes page and the API)."""
    nodes = list(Node.objects.all())
    running = workload([node.name for node in nodes])
    for node in nodes:
        node.running = running.get(node.name, [])
    return nodes


class JoinRefused(Exception):
    """A join the console does not accept; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


def local_facts(name: str | None = None) -> dict[str, Any]:
    """What this box has, as its node row keeps it."""
    name = name or settings.NODE_NAME
    data_dir = Path(settings.DATA_DIR)
    probe = data_dir if data_dir.exists() else Path(settings.BASE_DIR)
    memory = meminfo()
    extra: dict[str, Any] = {"memory_available_bytes": memory.get("MemAvailable", 0)}
    for provider in _fact_providers:
        try:
            extra.update(provider(name))
        except Exception:  # one failing provider must not stop the heartbeat
            logger.exception("node fact provider %r failed", provider)
    return {
        "address": settings.NODE_ADDRESS,
        "cpus": os.cpu_count() or 0,
        "memory_bytes": memory.get("MemTotal", 0),
        "disk_free_bytes": shutil.disk_usage(probe).free,
        "gpus": int(extra.pop("gpus", 0) or 0),
        "version": settings.CONSOLE_VERSION,
        "facts": extra,
    }


def heartbeat(name: str | None = None, facts: dict[str, Any] | None = None) -> Node:
    """This node is alive: create or refresh its row; an unreachable node comes back."""
    name = name or settings.NODE_NAME
    facts = facts if facts is not None else local_facts(name)
    now = timezone.now()
    with transaction.atomic():
        node, created = Node.objects.select_for_update().get_or_create(
            name=name, defaults={**facts, "last_heartbeat": now, "state_since": now}
        )
        came_back = not created and node.state == Node.State.UNREACHABLE
        if not created:
            for field, value in facts.items():
                setattr(node, field, value)
            node.last_heartbeat = now
            if came_back:
                node.state, node.state_since = Node.State.READY, now
            node.save()
    if came_back:
        logger.warning("node %s is back after %s", name, now - node.state_since)
        for hook in _back_hooks:
            hook(node)
    return node


def expect_back(name: str | None = None) -> None:
    """This box's worker is stopping on purpose (a restart, an upgrade): the sweep leaves the box
    alone for ``NODE_RESTART_GRACE_SECONDS`` more, so its replicas are not lost and replaced over a
    restart. Its engines and relay keep serving meanwhile."""
    grace = timezone.now() + timedelta(seconds=settings.NODE_RESTART_GRACE_SECONDS)
    Node.objects.filter(name=name or settings.NODE_NAME, state=Node.State.READY).update(last_heartbeat=grace)


def sweep(now: Any = None, spare: str | None = None) -> list[str]:
    """Mark nodes whose heartbeat stopped unreachable (never ``spare``: the box running the sweep);
    returns their names."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.NODE_LOST_SECONDS)
    lost = []
    for node in Node.objects.filter(state=Node.State.READY, last_heartbeat__lt=cutoff).exclude(name=spare or ""):
        # Conditional, so two sweeps at once (two beats by mistake) run the hooks once.
        if Node.objects.filter(pk=node.pk, state=Node.State.READY).update(
            state=Node.State.UNREACHABLE, state_since=now
        ):
            node.state, node.state_since = Node.State.UNREACHABLE, now
            logger.warning("node %s is unreachable: no heartbeat since %s", node.name, node.last_heartbeat)
            lost.append(node.name)
            for hook in _lost_hooks:
                hook(node)
    return lost


def cluster_settings() -> dict[str, str]:
    """What a joining box needs to share this console's state: the addresses other boxes use for
    the database and Redis, and the secret key (sealed secrets and sessions depend on it)."""
    database = settings.CLUSTER_DATABASE_URL
    if not database.startswith(("postgres://", "postgresql://")):
        raise JoinRefused(_("Several boxes share one PostgreSQL database; this console runs on SQLite. Set "
                            "DATABASE_URL (and CLUSTER_DATABASE_URL) to PostgreSQL first."), status=409)  # fmt: skip
    return {"DATABASE_URL": database, "REDIS_URL": settings.CLUSTER_REDIS_URL, "SECRET_KEY": settings.SECRET_KEY}


def join(raw_token: str, name: str, facts: dict[str, Any]) -> dict[str, str]:
    """Accept a new box: its one-time token is used up, its node row made; returns what it must set."""
    if not raw_token.startswith(JOIN_TOKEN_PREFIX) or len(raw_token) > 200:
        raise JoinRefused(_("This is not a join token."), status=401)
    now = timezone.now()
    with transaction.atomic():  # a refusal below leaves the token unused
        token = JoinToken.objects.select_for_update().filter(token_hash=hash_token(raw_token)).first()
        if token is None or not token.usable:
            raise JoinRefused(_("The join token is unknown, used already or expired: make a new one on the Nodes "
                                "page."), status=401)  # fmt: skip
        config = cluster_settings()  # only a valid token learns how this console is set up
        existing = Node.objects.select_for_update().filter(name=name).first()
        if existing is not None and existing.state == Node.State.READY:
            raise JoinRefused(_("A node named %(name)s is in the cluster and alive: give this box another "
                                "NODE_NAME.") % {"name": name}, status=409)  # fmt: skip
        token.used_at, token.used_by = now, name
        token.save(update_fields=["used_at", "used_by"])
        defaults = {**facts, "last_heartbeat": now, "state": Node.State.READY, "state_since": now, "draining": False}
        Node.objects.update_or_create(name=name, defaults=defaults)
    return config | {"NODE_NAME": name}
