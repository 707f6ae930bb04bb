"""GPUs, their samples at three resolutions, per-node probe state, alerts and webhooks."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from appliance import rollup


class Health(models.TextChoices):
    OK = "ok", _("Healthy")
    WARNING = "warning", _("Warning")
    CRITICAL = "critical", _("Critical")
    UNKNOWN = "unknown", _("Unknown")


HEALTH_ORDER = {Health.OK: 0, Health.UNKNOWN: 1, Health.WARNING: 2, Health.CRITICAL: 3}


class NodeProbe(models.Model):
    """What the last collection on a node found: which source, and NVML's reason when it failed."""

    node = models.CharField(max_length=63, unique=True)
    source = models.CharField(max_length=16)  # nvml / simulated
    ok = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    sampled_at = models.DateTimeField(default=timezone.now)
    sample_ms = models.FloatField(default=0)

    def __str__(self) -> str:
        return self.node

    @property
    def simulated(self) -> bool:
        return self.source == "simulated"


class Gpu(models.Model):
    """One GPU as last seen, with its current health."""

    node = models.CharField(max_length=63, db_index=True)
    index = models.PositiveSmallIntegerField()
    uuid = models.CharField(max_length=100, unique=True)
    name = models.CharField(max_length=200, blank=True)
    serial = models.CharField(max_length=100, blank=True)
    pci_bus_id = models.CharField(max_length=100, blank=True)
    simulated = models.BooleanField(default=False)
    health = models.CharField(max_length=16, choices=Health.choices, default=Health.UNKNOWN)
    health_reasons = models.JSONField(default=list, blank=True)  # gpus.health.Finding.reason() of each finding
    latest = models.JSONField(default=dict, blank=True)
    last_seen = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["node", "index"]

    def __str__(self) -> str:
        return f"{self.node} GPU {self.index} ({self.name})"

    @property
    def accepts_new_replicas(self) -> bool:
        """A GPU in critical health (or not seen lately) gets no new replicas."""
        return self.health != Health.CRITICAL and self.health != Health.UNKNOWN

    @property
    def badge(self) -> str:
        """The colour its health is shown in (a badge class)."""
        return {Health.OK: "ok", Health.WARNING: "warn", Health.CRITICAL: "bad"}.get(self.health, "")

    @property
    def reasons(self) -> list[str]:
        """Why the GPU has its health, in the reader's language."""
        from gpus.health import describe

        return [describe(r["text"], r.get("params")) if isinstance(r, dict) else str(r) for r in self.health_reasons]

    @property
    def english_reasons(self) -> list[str]:
        """The same in English (the API)."""
        return [r.get("message", r["text"]) if isinstance(r, dict) else str(r) for r in self.health_reasons]

    @property
    def mem_percent(self) -> int | None:
        used, total = self.latest.get("mem_used"), self.latest.get("mem_total")
        return round(100 * used / total) if used is not None and total else None


class GpuSample(models.Model):
    """Readings of one GPU: raw every few seconds, and averages (maxima for counters) per minute and
    per hour. One table, keyed by (gpu, resolution, time), so a chart is one index range scan."""

    Resolution = rollup.Resolution

    gpu = models.ForeignKey(Gpu, on_delete=models.CASCADE, related_name="samples")
    resolution = models.CharField(max_length=8, choices=Resolution.choices, default=Resolution.RAW)
    time = models.DateTimeField()
    util_gpu = models.FloatField(null=True)
    mem_used = models.BigIntegerField(null=True)
    temperature = models.FloatField(null=True)
    power_draw = models.FloatField(null=True)
    sm_clock = models.FloatField(null=True)
    throttle_reasons = models.BigIntegerField(null=True)  # OR of the bucket's bitmasks
    pcie_replay = models.BigIntegerField(null=True)  # counter: the bucket's maximum
    ecc_dbe_volatile = models.BigIntegerField(null=True)
    xid_count = models.IntegerField(default=0)

    class Meta:
        indexes = [models.Index(fields=["gpu", "resolution", "time"], name="gpusample_chart")]

    def __str__(self) -> str:
        return f"{self.gpu_id} {self.resolution} {self.time:%Y-%m-%d %H:%M:%S}"


class Alert(models.Model):
    """A health finding on a GPU, opened and resolved automatically, one open alert per rule.

    Level conditions (heat, throttling, replays) resolve when they clear; latched ones (XIDs, ECC
    double-bit errors, row-remap failures) stay open until an admin acknowledges them."""

    gpu = models.ForeignKey(Gpu, on_delete=models.CASCADE, related_name="alerts")
    rule = models.CharField(max_length=50)
    severity = models.CharField(max_length=16, choices=Health.choices)
    message = models.CharField(max_length=500)  # in English, for webhooks and the API
    text = models.CharField(max_length=200, blank=True)  # the catalogue string behind it (gpus.health)
    params = models.JSONField(default=dict, blank=True)  # and its values
    latched = models.BooleanField(default=False)
    opened_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    occurrences = models.PositiveIntegerField(default=1)
    resolved_at = models.DateTimeField(null=True, blank=True)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-opened_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["gpu", "rule"], condition=models.Q(resolved_at__isnull=True), name="one_open_alert_per_rule"
            )
        ]

    def __str__(self) -> str:
        return f"{self.get_severity_display()}: {self.message}"

    @property
    def is_open(self) -> bool:
        return self.resolved_at is None

    @property
    def display_message(self) -> str:
        """The alert in the reader's language (older alerts, stored as English only, as they are)."""
        from gpus.health import describe

        return describe(self.text, self.params) if self.text else self.message


class Webhook(models.Model):
    """Where alert openings and resolutions are POSTed as JSON."""

    name = models.CharField(_("name"), max_length=100)
    url = models.URLField(_("address"), max_length=500)
    enabled = models.BooleanField(_("enabled"), default=True)

    def __str__(self) -> str:
        return self.name


class WebhookDelivery(models.Model):
    """One POST of one alert event to one webhook, retried with backoff; failures stay visible."""

    class Status(models.TextChoices):
        PENDING = "pending", _("Pending")
        SENT = "sent", _("Sent")
        FAILED = "failed", _("Failed")

    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    # The GPU alert it reports, if it is one; other alerts (a deployment past its targets) are in the
    # payload only: this app knows nothing of them.
    alert = models.ForeignKey(Alert, null=True, blank=True, on_delete=models.CASCADE, related_name="deliveries")

    class Event(models.TextChoices):
        OPENED = "opened", _("alert opened")
        RESOLVED = "resolved", _("alert resolved")

    event = models.CharField(max_length=16, choices=Event.choices)
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.event} of alert {self.alert_id} to {self.webhook_id}: {self.status}"


class SimulatedFault(models.Model):
    """A fault injected into the SIMULATED source (demos and tests only)."""

    node = models.CharField(max_length=63)
    gpu_index = models.PositiveSmallIntegerField()
    kind = models.CharField(max_length=16)  # xid / ecc_dbe / overheat / pcie_replay / lost
    value = models.IntegerField(null=True, blank=True)
    once = models.BooleanField(default=True, help_text="Applied to one sample only (XIDs are events).")
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.kind} on {self.node} GPU {self.gpu_index}"
