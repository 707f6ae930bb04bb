"""The node registry: each box of the appliance, as its worker registers it and keeps it alive.

States: ``ready`` while its worker heartbeats, ``unreachable`` once no heartbeat came for
``NODE_LOST_SECONDS`` (set by the sweep, ``nodes.registry.sweep``), ``ready`` again when one comes.
Draining is an admin's flag beside the state: a draining node gets no new replicas.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from appliance.models import hash_token

JOIN_TOKEN_PREFIX = "join_"  # noqa: S105 - a public prefix, not a secret


class NodeAlive(Exception):
    """A node that still heartbeats cannot be forgotten."""


class Node(models.Model):
    class State(models.TextChoices):
        READY = "ready", _("Ready")
        UNREACHABLE = "unreachable", _("Unreachable")

    name = models.CharField(_("name"), max_length=63, unique=True)
    address = models.CharField(_("cluster address"), max_length=255, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.READY, db_index=True)
    draining = models.BooleanField(default=False)
    cpus = models.PositiveIntegerField(default=0)
    memory_bytes = models.PositiveBigIntegerField(default=0)
    disk_free_bytes = models.PositiveBigIntegerField(default=0)
    gpus = models.PositiveSmallIntegerField(default=0)
    version = models.CharField(max_length=50, blank=True)
    facts = models.JSONField(default=dict, blank=True)  # what else the worker reports (engine runtimes, …)
    joined_at = models.DateTimeField(default=timezone.now)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    state_since = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def display_state(self) -> str:
        """What the Nodes page says: draining wins over ready, unreachable over both."""
        if self.state == self.State.UNREACHABLE:
            return str(self.State.UNREACHABLE.label)
        return str(_("Draining")) if self.draining else str(self.State.READY.label)

    def set_draining(self, draining: bool) -> None:
        Node.objects.filter(pk=self.pk).update(draining=draining)
        self.draining = draining

    def forget(self) -> None:
        """Remove an unreachable node from the registry (a box taken out of service); refused with
        ``NodeAlive`` while it heartbeats, since its worker would register it again at once."""
        if self.state != self.State.UNREACHABLE:
            raise NodeAlive(_("%(node)s is alive: drain it and stop its worker before forgetting it.")
                            % {"node": self.name})  # fmt: skip
        self.delete()

    @property
    def accepts_new_replicas(self) -> bool:
        return self.state == self.State.READY and not self.draining

    @property
    def seconds_since_heartbeat(self) -> float | None:
        return (timezone.now() - self.last_heartbeat).total_seconds() if self.last_heartbeat else None


class JoinToken(models.Model):
    """A one-time secret that lets one new box join (``manage.py join``). Only its hash is stored."""

    hint = models.CharField(max_length=16)
    token_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    used_by = models.CharField(max_length=63, blank=True)  # the node that joined with it

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{JOIN_TOKEN_PREFIX}{self.hint}…"

    @classmethod
    def issue(cls, user: object = None, hours: int = 1) -> tuple[JoinToken, str]:
        raw = JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(
            hint=raw[len(JOIN_TOKEN_PREFIX) : len(JOIN_TOKEN_PREFIX) + 6], token_hash=hash_token(raw),
            created_by=user, expires_at=timezone.now() + timedelta(hours=hours),
        )  # fmt: skip
        return token, raw

    @property
    def usable(self) -> bool:
        return self.used_at is None and self.expires_at > timezone.now()
