"""Hub endpoints, local models, their files, and the jobs that fetch, update, import, verify and
delete them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from appliance.archiving import delete_or_archive
from appliance.jobs import Job, JobStatus
from appliance.sealing import seal, unseal


class HubEndpoint(models.Model):
    """Where models come from: the Hugging Face hub, a mirror of it, or another appliance's /hf/."""

    class Kind(models.TextChoices):
        HUB = "hub", _("Hugging Face hub")
        MIRROR = "mirror", _("Hub mirror")
        PEER = "peer", _("Peer appliance")

    name = models.CharField(_("name"), max_length=100, unique=True)
    url = models.URLField(_("address"), max_length=300)
    kind = models.CharField(_("kind"), max_length=16, choices=Kind.choices, default=Kind.HUB)
    # The access token, encrypted with a key derived from SECRET_KEY; never shown again.
    token_sealed = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.url})"

    def set_token(self, token: str) -> None:
        self.token_sealed = seal(token) if token else ""

    def token(self) -> str | None:
        return unseal(self.token_sealed) if self.token_sealed else None

    @property
    def has_token(self) -> bool:
        return bool(self.token_sealed)


class LiveModelManager(models.Manager):
    """Models that are not archived: what pages, the API, pickers and the mirror see.
    ``LocalModel.all_objects`` has the archived ones too."""

    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().filter(archived_at__isnull=True)


class AllModelsManager(models.Manager):
    """Every model, archived ones too (for history)."""


# Words in a failed download's error that say why (``LocalModel.error_hint``): httpx's and the OS's for a
# hub that cannot be reached, huggingface_hub's for one that refused the repository.
UNREACHABLE_SIGNS = ("ConnectError", "ConnectTimeout", "Connection refused", "All connection attempts failed",
                     "Name or service not known", "Temporary failure in name resolution", "Network is unreachable",
                     "No route to host", "OfflineModeIsEnabled", "LocalEntryNotFoundError")  # fmt: skip
REFUSED_SIGNS = ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError", "401 Client Error",
                 "403 Client Error", "404 Client Error")  # fmt: skip


class LocalModel(models.Model):
    """A model stored on this appliance.

    Status transitions::

        downloading ──► verifying ──► ready ◄──► outdated
            │               │           │  (update: outdated ──► downloading ──► verifying ──► ready)
            └──► failed ◄───┘           └──► deleting ──► (row removed, or archived)

    ``failed`` models can be resumed (download again, keeping finished files). A failed update
    leaves the ready copy untouched, so the model goes back to ``outdated``.

    Deleting a model always frees its disk. When deleted deployments kept for past bills still name
    it, its row is archived instead of removed (``archived_at``; files and source forgotten) and
    ``objects`` no longer finds it. Its repository name is free again: the same repository can be
    downloaded or imported anew, as a new row.
    """

    class Status(models.TextChoices):
        DOWNLOADING = "downloading", _("Downloading")
        VERIFYING = "verifying", _("Verifying")
        READY = "ready", _("Ready")
        OUTDATED = "outdated", _("Update available")
        FAILED = "failed", _("Failed")
        DELETING = "deleting", _("Deleting")

    class Source(models.TextChoices):
        HUB = "hub", _("Hugging Face hub")
        MIRROR = "mirror", _("Hub mirror")
        PEER = "peer", _("Peer appliance")
        IMPORTED = "imported", _("Imported directory")

    USABLE = frozenset({Status.READY, Status.OUTDATED})

    repo_id = models.CharField(_("repository"), max_length=200)
    revision = models.CharField(_("tracked branch"), max_length=200, default="main")
    commit = models.CharField(max_length=64, blank=True, help_text="Commit of the ready copy.")
    upstream_commit = models.CharField(max_length=64, blank=True)
    changed_files = models.JSONField(default=list, blank=True)
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.HUB)
    endpoint = models.ForeignKey(HubEndpoint, null=True, blank=True, on_delete=models.PROTECT, related_name="models")
    import_path = models.CharField(max_length=1000, blank=True)
    allow_patterns = models.JSONField(default=list, blank=True)
    ignore_patterns = models.JSONField(default=list, blank=True)
    node = models.CharField(max_length=63, help_text="The box whose disk holds the model.")
    size_bytes = models.BigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DOWNLOADING, db_index=True)
    error = models.TextField(blank=True)
    config = models.JSONField(default=dict, blank=True)
    parameter_count = models.BigIntegerField(null=True, blank=True)
    allow_remote_code = models.BooleanField(
        default=False, help_text="An admin allowed deployments of this model to use --trust-remote-code."
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    archived_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = LiveModelManager()
    all_objects = AllModelsManager()

    class Meta:
        ordering = ["repo_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["repo_id"], condition=models.Q(archived_at__isnull=True), name="unique_live_model_repo"
            )
        ]

    def __str__(self) -> str:
        return self.repo_id

    @property
    def directory(self) -> Path:
        """Everything of this model lives below here: snapshots/, staging/, current (a symlink)."""
        from models_catalog.layout import model_directory

        return model_directory(self.repo_id)

    @property
    def ready_path(self) -> Path:
        """What engines load: a symlink replaced atomically on update."""
        return self.directory / "current"

    @property
    def is_usable(self) -> bool:
        return self.status in self.USABLE

    def held_on(self, node: str) -> bool:
        """``node`` has this model's ready files at its current commit: its own box, or a box with a
        current copy (``ModelCopy``)."""
        if not self.is_usable:
            return False
        if self.node == node:
            return True
        copy = self.copies.filter(node=node).first()
        return copy is not None and copy.usable

    def active_job(self) -> ModelJob | None:
        return self.jobs.filter(status__in=list(JobStatus.ACTIVE)).first()  # type: ignore[attr-defined]

    def shown_job(self, recent: timedelta = timedelta(minutes=10)) -> ModelJob | None:
        """The job the model page shows with its bar: the one running, or the last one if it ended in
        the last minutes (the page reloads when a job ends: its bar then shows where it ended, 100 %
        for a finished download, instead of vanishing at the last value polled)."""
        active = self.active_job()
        if active is not None:
            return active
        last = self.jobs.exclude(status__in=list(JobStatus.ACTIVE)).order_by("-pk").first()  # type: ignore[attr-defined]
        if last is not None and last.finished_at and last.finished_at > timezone.now() - recent:
            return last
        return None

    def error_hint(self) -> str | None:
        """What to do about the last failed download, when its error says what went wrong: a hub that
        cannot be reached (no internet, as appliances often have none), or one that refused the name."""
        if not self.error or self.source == self.Source.IMPORTED:
            return None
        job = self.jobs.filter(status=JobStatus.FAILED).order_by("-pk").first()
        text = f"{job.error if job else ''} {self.error}"
        if any(sign in text for sign in UNREACHABLE_SIGNS):
            return _("The hub could not be reached from this appliance. Without internet access, download from "
                     "a mirror on your network (add it under Model sources), or copy the model onto a disk and "
                     "import it from its directory.")  # fmt: skip
        if any(sign in text for sign in REFUSED_SIGNS):
            return _("The hub refused the repository or revision: check the name and the branch, and whether "
                     "the repository needs an access token (set on its model source).")  # fmt: skip
        return None

    def in_use_by(self) -> list[str]:
        """Names of what uses this model (deployments register a check in ``USAGE_CHECKS``)."""
        return [name for check in USAGE_CHECKS for name in check(self)]

    def start_job(self, kind: str, user: Any = None, enqueue: bool = True) -> ModelJob:
        """Create and enqueue a job; refuses with ``JobConflict`` while another job runs on it.

        ``enqueue=False`` is for management commands, which run the job in their own process."""
        with transaction.atomic():
            LocalModel.objects.select_for_update().filter(pk=self.pk).first()
            running = self.active_job()
            if running is not None:
                raise JobConflict(
                    _("%(repo)s already has a %(kind)s job running.")
                    % {"repo": self.repo_id, "kind": running.get_kind_display()}
                )
            job = ModelJob.objects.create(model=self, repo_id=self.repo_id, kind=kind, node=self.node, created_by=user)
            if enqueue:
                job.enqueue()
        return job

    @classmethod
    def request_download(
        cls,
        repo_id: str,
        revision: str = "main",
        endpoint: HubEndpoint | None = None,
        allow_patterns: list[str] | None = None,
        ignore_patterns: list[str] | None = None,
        user: Any = None,
        enqueue: bool = True,
    ) -> ModelJob:
        """Start downloading a model, or resume a failed download of it."""
        from models_catalog.layout import check_repo_id

        check_repo_id(repo_id)
        with transaction.atomic():
            model = cls.objects.select_for_update().filter(repo_id=repo_id).first()
            if model is not None and model.status != cls.Status.FAILED:
                raise JobConflict(_("%(repo)s is already on this appliance.") % {"repo": repo_id})
            if model is None:
                model = cls(repo_id=repo_id, node=settings.NODE_NAME)
            model.revision = revision
            model.endpoint = endpoint
            model.source = endpoint.kind if endpoint is not None else cls.Source.HUB
            model.allow_patterns = allow_patterns or []
            model.ignore_patterns = ignore_patterns or []
            model.status = cls.Status.DOWNLOADING
            model.error = ""
            model.save()
            return model.start_job(ModelJob.Kind.DOWNLOAD, user, enqueue)

    @classmethod
    def request_import(
        cls, directory: str, repo_id: str, user: Any = None, enqueue: bool = True, replace: bool = False
    ) -> ModelJob:
        """Start importing a model from a local directory (checked again by the job).

        A model of that name that exists already is replaced only when asked (``replace``), and never
        while a deployment uses it: importing under a taken name is more often a mistake than meant."""
        from models_catalog.importer import scan
        from models_catalog.layout import check_repo_id

        check_repo_id(repo_id)
        scan(Path(directory))  # refuse at once what the job would refuse
        with transaction.atomic():
            model = cls.objects.select_for_update().filter(repo_id=repo_id).first()
            if model is not None and model.status not in (cls.Status.FAILED, *cls.USABLE):
                raise JobConflict(_("%(repo)s is busy.") % {"repo": repo_id})
            if model is not None and model.status != cls.Status.FAILED:
                users = model.in_use_by()
                if users:
                    raise JobConflict(_("%(repo)s exists already and is used by %(users)s: import under another "
                                        "name, or stop and delete those first.")
                                      % {"repo": repo_id, "users": ", ".join(users)})  # fmt: skip
                if not replace:
                    raise JobConflict(_("%(repo)s exists already: import under another name, or choose to replace "
                                        "its files.") % {"repo": repo_id})  # fmt: skip
            if model is None:
                model = cls(repo_id=repo_id, node=settings.NODE_NAME, status=cls.Status.DOWNLOADING)
            model.source = cls.Source.IMPORTED
            model.import_path = directory
            model.endpoint = None
            model.save()
            return model.start_job(ModelJob.Kind.IMPORT, user, enqueue)

    def resume(self, user: Any = None) -> ModelJob:
        """Fetch the model again as it was first fetched: the import again for an imported one, else
        the download (a failed download resumes where it stopped). The model page's "resume" and the
        API's ``POST /models/{id}/resume``."""
        if self.source == self.Source.IMPORTED:
            return LocalModel.request_import(self.import_path, self.repo_id, user, replace=True)
        return LocalModel.request_download(
            self.repo_id, self.revision, self.endpoint, self.allow_patterns, self.ignore_patterns, user=user
        )

    def request_delete(self, user: Any = None) -> ModelJob:
        users = self.in_use_by()
        if users:
            raise JobConflict(
                _("%(repo)s is used by %(users)s; stop and delete those first.")
                % {"repo": self.repo_id, "users": ", ".join(users)}
            )
        job = self.start_job(ModelJob.Kind.DELETE, user)
        LocalModel.objects.filter(pk=self.pk).update(status=self.Status.DELETING)
        return job

    def remove_row(self) -> str:
        """After its files are gone: delete the row, or archive it while deployments kept for past
        bills name it; ``"deleted"`` or ``"archived"``."""
        return delete_or_archive(self, self.archive)

    def archive(self) -> None:
        self.files.all().delete()
        now = timezone.now()
        LocalModel.all_objects.filter(pk=self.pk).update(archived_at=now, endpoint=None)
        self.archived_at, self.endpoint = now, None

    def facts(self) -> dict[str, Any]:
        from models_catalog.memory import model_facts

        weights = sum(f.size for f in self.files.all() if f.path.endswith(".safetensors"))
        return model_facts(self.config, self.parameter_count, weights or self.size_bytes)


class JobConflict(Exception):
    """The action cannot start now (another job runs, the model is in use or already here)."""


# Callables returning the names of deployments (or anything else) using a model.
USAGE_CHECKS: list[Callable[[LocalModel], list[str]]] = []


class ModelFile(models.Model):
    """One file of a model's ready copy, with the digests it was verified against."""

    model = models.ForeignKey(LocalModel, on_delete=models.CASCADE, related_name="files")
    path = models.CharField(max_length=1000)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64, blank=True)
    # The git blob id (sha1 of "blob <size>\0" + content), the hub's etag for files not in LFS.
    blob_id = models.CharField(max_length=40, blank=True)
    is_lfs = models.BooleanField(default=False)

    class Meta:
        ordering = ["path"]
        constraints = [models.UniqueConstraint(fields=["model", "path"], name="unique_model_file_path")]

    def __str__(self) -> str:
        return self.path

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.blob_id


class ModelJob(Job):
    """A download, update, import, verification or deletion of one model."""

    class Kind(models.TextChoices):
        DOWNLOAD = "download", _("Download")
        UPDATE = "update", _("Update")
        IMPORT = "import", _("Import")
        VERIFY = "verify", _("Verify")
        DELETE = "delete", _("Delete")
        SYNC = "sync", _("Copy to another box")

    task_name = "models_catalog.run_model_job"

    model = models.ForeignKey(LocalModel, null=True, on_delete=models.SET_NULL, related_name="jobs")
    repo_id = models.CharField(max_length=200)  # kept after the model row is deleted
    kind = models.CharField(max_length=16, choices=Kind.choices)

    class Meta(Job.Meta):
        pass

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.repo_id}"

    @property
    def detail(self) -> dict[str, Any]:
        return self.progress_detail or {}

    def on_failed(self, message: str) -> None:
        """A failed update or re-import leaves the ready copy untouched and usable; anything else
        marks the model failed with the reason."""
        if self.kind == self.Kind.SYNC:  # the model itself is fine: only the copy on that box failed
            ModelCopy.objects.filter(model_id=self.model_id, node=self.node).update(
                status=ModelCopy.Status.FAILED, error=message
            )
            return
        model = LocalModel.objects.filter(pk=self.model_id).first()
        if model is None:
            return
        status = LocalModel.Status.FAILED
        if self.kind == self.Kind.UPDATE:
            status = LocalModel.Status.OUTDATED
        elif self.kind == self.Kind.IMPORT and model.is_usable:
            status = model.status
        LocalModel.objects.filter(pk=model.pk).update(status=status, error=message)


class ModelCopy(models.Model):
    """A copy of a model on another box than its own (``LocalModel.node``), made by a sync job on
    that box from a box that holds the model, node to node over the relays' ``/hf/``
    (``models_catalog.copies``). Placement asks for one when it chooses a box without the model.
    A copy is usable only at the model's commit: after an update it is synced again."""

    class Status(models.TextChoices):
        SYNCING = "syncing", _("Copying")
        READY = "ready", _("Ready")
        FAILED = "failed", _("Failed")

    model = models.ForeignKey(LocalModel, on_delete=models.CASCADE, related_name="copies")
    node = models.CharField(max_length=63)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.SYNCING)
    commit = models.CharField(max_length=64, blank=True)  # of the files on that box, once ready
    source_node = models.CharField(max_length=63, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model", "node"]
        constraints = [models.UniqueConstraint(fields=["model", "node"], name="unique_model_copy_per_node")]

    def __str__(self) -> str:
        return f"{self.model} on {self.node}"

    @property
    def usable(self) -> bool:
        return self.status == self.Status.READY and self.commit == self.model.commit
