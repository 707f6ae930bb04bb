"""What the gateway needs from the database, cached in the process so that no request waits on a
synchronous ORM call: keys (key id → department, limits, allowed models) and routes (served model
name → ready replicas). Entries live ``GATEWAY_CACHE_SECONDS`` (0.5 s by default), so a revoked key,
a changed quota or a replica that became ready takes effect within a second; one load per entry at
a time, in a worker thread."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connections

from provisioning import relay
from tenancy import keys as key_format
from tenancy.limiter import Limits

PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}


@dataclass(frozen=True)
class KeyInfo:
    pk: int
    key_hash: str
    name: str
    department_id: int
    department: str
    priority: str
    limits: Limits  # the department's
    key_limits: Limits  # the key's own (counted for the key alone)
    effective: Limits  # both narrowed together: what the x-ratelimit-limit headers announce
    max_tokens_cap: int | None
    models: frozenset[str]  # served model names the key may use
    not_after: float | None  # expiry or end of the rotation grace / revocation, as a timestamp

    def usable(self, now: float) -> bool:
        return self.not_after is None or now < self.not_after


@dataclass(frozen=True)
class ReplicaRoute:
    pk: int
    base_url: str
    key: str


@dataclass(frozen=True)
class Route:
    deployment_id: int
    name: str
    priority_scheduling: bool
    replicas: tuple[ReplicaRoute, ...]
    created: int
    context: int | None = None  # the deployment's max_model_len, when set: bounds every reservation
    media: bool = False  # image/audio/video parts accepted (the engine runs with --limit-mm-per-prompt)
    ttft_target: float | None = None  # seconds: the deployment's p99 TTFT target (admission holds it)


@dataclass
class _Entry:
    value: Any
    loaded: float
    loading: asyncio.Future | None = field(default=None)


def _timestamp(*moments: datetime | None) -> float | None:
    present = [m.timestamp() for m in moments if m is not None]
    return min(present) if present else None


def _closing(load: Any) -> Any:
    """Run a loader in a pool thread and close that thread's connections after: a loaded entry lives
    half a second, and an idle connection held per thread would outlive the gateway (and block a
    test database's teardown)."""

    def run(*args: Any) -> Any:
        try:
            return load(*args)
        finally:
            connections.close_all()

    return run


def _load_key(key_id: str) -> KeyInfo | None:
    from tenancy.models import ApiKey

    close_old_connections()
    key = ApiKey.objects.select_related("department").filter(key_id=key_id).first()
    if key is None or key.archived_at is not None or key.department.archived_at is not None:
        return None  # deleted, kept only for the bills: unknown to the gateway
    allowed = key.allowed_deployment_ids()  # all of the department's, or exactly the key's list (maybe none)
    from provisioning.models import Deployment

    names = frozenset(
        Deployment.objects.filter(pk__in=allowed, archived_at__isnull=True).values_list("name", flat=True)
    )
    department = key.department
    return KeyInfo(
        pk=key.pk, key_hash=key.key_hash, name=key.name, department_id=department.pk, department=department.name,
        priority=department.priority, limits=department.limits(), key_limits=key.own_limits(),
        effective=key.limits(), max_tokens_cap=key.max_tokens_cap(), models=names,
        not_after=_timestamp(key.expires_at, key.revoked_at),
    )  # fmt: skip


def _replica_url(replica: Any, addresses: dict[str, str]) -> str | None:
    """A replica of this box is reached on loopback; one of another box through that box's relay
    (its engine is never on the network), or not at all while the box has no known address."""
    if replica.node == settings.NODE_NAME:
        return replica.base_url
    address = addresses.get(replica.node)
    return relay.url(address, replica.pk) if address else None


def _load_routes() -> dict[str, Route]:
    from nodes.models import Node
    from provisioning.models import Deployment, Replica

    close_old_connections()
    routes: dict[str, list] = {}
    deployments = {d.pk: d for d in Deployment.objects.select_related("runtime")}
    ready = Replica.objects.filter(state=Replica.State.READY, port__isnull=False).order_by("deployment_id", "ordinal")
    addresses = dict(Node.objects.exclude(address="").values_list("name", "address"))
    for replica in ready:
        base_url = _replica_url(replica, addresses)
        if base_url is not None:
            routes.setdefault(replica.deployment_id, []).append(ReplicaRoute(replica.pk, base_url, replica.key()))
    table = {}
    for pk, deployment in deployments.items():
        able = deployment.capabilities()  # the engine says what it does; the gateway does not read flags
        running = deployment.desired == deployment.Desired.RUNNING
        table[deployment.name] = Route(
            pk, deployment.name, able.priority_scheduling, tuple(routes.get(pk, ()) if running else ()),
            int(deployment.created_at.timestamp()), deployment.max_model_len or None, able.media,
            deployment.target_ttft_p99_ms / 1000 if deployment.target_ttft_p99_ms else None,
        )  # fmt: skip
    return table


class Directory:
    """The per-process caches (one per event loop: the gateway app owns one)."""

    def __init__(self, ttl: float | None = None) -> None:
        self.ttl = settings.GATEWAY_CACHE_SECONDS if ttl is None else ttl
        self._keys: dict[str, _Entry] = {}
        self._routes: _Entry | None = None

    async def _cached(self, entry: _Entry | None, load: Any, *args: Any) -> tuple[_Entry, Any]:
        now = time.monotonic()
        if entry is not None and now - entry.loaded < self.ttl:
            return entry, entry.value
        if entry is not None and entry.loading is not None:
            return entry, await asyncio.shield(entry.loading)
        if entry is None:
            entry = _Entry(None, 0.0)
        entry.loading = asyncio.get_running_loop().create_future()
        try:
            value = await sync_to_async(_closing(load), thread_sensitive=False)(*args)
        except BaseException as exc:
            entry.loading.set_exception(exc)
            entry.loading.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            entry.loading = None
            raise
        entry.value, entry.loaded = value, time.monotonic()
        entry.loading.set_result(value)
        entry.loading = None
        return entry, value

    async def key(self, raw: str) -> KeyInfo | None:
        """The key's details when ``raw`` is a well-formed, known key whose secret matches; else None."""
        try:
            parsed = key_format.parse(raw)
        except key_format.MalformedKey:
            return None
        entry, info = await self._cached(self._keys.get(parsed.key_id), _load_key, parsed.key_id)
        if len(self._keys) > 100_000:  # unknown ids sprayed at us: forget, don't grow without bound
            self._keys.clear()
        self._keys[parsed.key_id] = entry
        if info is None or not key_format.matches(raw, info.key_hash):
            return None
        return info

    async def routes(self) -> dict[str, Route]:
        self._routes, table = await self._cached(self._routes, _load_routes)
        return table

    def forget(self) -> None:
        self._keys.clear()
        self._routes = None


def priority_rank(priority: str) -> int:
    return PRIORITY_RANK.get(priority, 1)
