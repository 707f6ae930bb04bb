"""The job row: every long action is a row that a Celery task, given only the row's id, carries out.

Status transitions::

    queued ──► running ──► succeeded
      │           ├──────► failed      (an exception, or the worker running it died)
      └───────────┴──────► cancelled   (queued: at once; running: when the task next reports progress)

Terminal states are ``JobStatus.TERMINAL``. The pattern, for every subclass:
- ``job.enqueue()`` sends the task only once the transaction that created the row commits;
- ``run_job(Model, job_id, body)`` reloads the row, exits if it is no longer active, claims it with
  a conditional UPDATE (so a message delivered twice runs once), runs ``body`` and writes the
  outcome, including any exception, on the row;
- a worker that starts fails the rows its previous incarnation left running (``recover_orphans``),
  and a periodic task does the same for nodes whose worker stopped sending heartbeats.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

from django.apps import apps
from django.conf import settings
from django.db import models, transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

logger = logging.getLogger(__name__)

LOG_TAIL_CHARS = 8000
CANCELLED = "Cancelled by an admin; start it again to resume where it stopped."


class JobStatus(models.TextChoices):
    QUEUED = "queued", _("Queued")
    RUNNING = "running", _("Running")
    SUCCEEDED = "succeeded", _("Succeeded")
    FAILED = "failed", _("Failed")
    CANCELLED = "cancelled", _("Cancelled")


JobStatus.ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})  # type: ignore[attr-defined]
JobStatus.TERMINAL = frozenset(  # type: ignore[attr-defined]
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
)


class JobCancelled(Exception):
    """Raised inside a job body when an admin asked to cancel it."""


class Job(models.Model):
    """Abstract base of every job row. Subclasses set ``task_name`` and, for work that must run on
    a particular box, ``node`` (their task then goes to that node's queue)."""

    task_name: str = ""

    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True)
    progress = models.FloatField(default=0.0)  # 0..1
    progress_detail = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    log_tail = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    # Empty node: any worker may run it (the ``default`` queue).
    node = models.CharField(max_length=63, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        abstract = True
        ordering = ["-created_at"]

    @property
    def is_active(self) -> bool:
        return self.status in JobStatus.ACTIVE  # type: ignore[attr-defined]

    @property
    def percent(self) -> int:
        return max(0, min(100, round(self.progress * 100)))

    def queue_name(self) -> str:
        return f"node.{self.node}" if self.node else "default"

    def enqueue(self) -> None:
        """Send the task once the surrounding transaction commits (at once outside one)."""
        from appliance.celery import app

        name, args, queue = self.task_name, [self.pk], self.queue_name()
        transaction.on_commit(lambda: app.send_task(name, args=args, queue=queue))

    def _update(self, only_if: dict[str, Any] | None = None, **fields: Any) -> bool:
        """Conditional UPDATE of this row; refreshes the instance's copies of the fields."""
        updated = type(self).objects.filter(pk=self.pk, **(only_if or {})).update(**fields)
        if updated:
            for key, value in fields.items():
                setattr(self, key, value)
        return bool(updated)

    def claim(self, worker: str) -> bool:
        """Take the row from queued to running; False when another delivery already took it."""
        now = timezone.now()
        return self._update(
            only_if={"status": JobStatus.QUEUED},
            status=JobStatus.RUNNING,
            started_at=now,
            heartbeat_at=now,
            worker=worker,
        )

    def report(self, progress: float | None = None, **detail: Any) -> None:
        """Record progress and raise ``JobCancelled`` if an admin asked to cancel."""
        fields: dict[str, Any] = {"heartbeat_at": timezone.now()}
        if progress is not None:
            fields["progress"] = max(0.0, min(1.0, float(progress)))
        if detail:
            fields["progress_detail"] = {**self.progress_detail, **detail}
        self._update(**fields)
        if type(self).objects.filter(pk=self.pk, cancel_requested=True).exists():
            raise JobCancelled()

    def log(self, line: str) -> None:
        """Append a line to the log tail, keeping only the last ``LOG_TAIL_CHARS`` characters."""
        tail = (self.log_tail + line.rstrip("\n") + "\n")[-LOG_TAIL_CHARS:]
        self._update(log_tail=tail)

    def _finish(self, status: str, **fields: Any) -> bool:
        return self._update(
            only_if={"status__in": list(JobStatus.ACTIVE)},  # type: ignore[attr-defined]
            status=status,
            finished_at=timezone.now(),
            **fields,
        )

    def succeed(self) -> bool:
        return self._finish(JobStatus.SUCCEEDED, progress=1.0)

    def fail(self, error: str) -> bool:
        return self._finish(JobStatus.FAILED, error=error[:4000])

    def on_failed(self, message: str) -> None:
        """Called after the row failed or was cancelled, whoever noticed (the task, or the recovery
        of a dead worker's rows). Subclasses put the object they work on into a matching state."""

    def cancel(self) -> bool:
        """Cancel now if queued; ask the running task to stop otherwise. False if already over."""
        if self._update(
            only_if={"status": JobStatus.QUEUED},
            status=JobStatus.CANCELLED,
            finished_at=timezone.now(),
            cancel_requested=True,
        ):
            self.on_failed(CANCELLED)
            return True
        return self._update(only_if={"status": JobStatus.RUNNING}, cancel_requested=True)


JobT = TypeVar("JobT", bound=Job)


def run_job(model: type[JobT], job_id: int, body: Callable[[JobT], None], worker: str = "") -> str:
    """Carry out one job row; returns the status it ended in (or why it did nothing)."""
    job = model.objects.filter(pk=job_id).first()
    if job is None:
        return "missing"
    if not job.is_active:
        return f"already {job.status}"
    if job.status != JobStatus.QUEUED or not job.claim(worker or settings.NODE_NAME):
        return "claimed elsewhere"
    try:
        body(job)
    except JobCancelled:
        job._finish(JobStatus.CANCELLED)
        job.on_failed(CANCELLED)
    except Exception as exc:  # written on the row, never swallowed
        logger.exception("job %s %s failed", model.__name__, job_id)
        job.log(traceback.format_exc())
        job.fail(f"{type(exc).__name__}: {exc}")
        job.on_failed(str(exc))
    else:
        job.succeed()
    job.refresh_from_db(fields=["status"])
    return job.status


def job_models() -> Iterator[type[Job]]:
    for model in apps.get_models():
        if issubclass(model, Job):
            yield model


def recover_orphans(worker: str, reason: str) -> int:
    """Fail the rows ``worker`` had running: called when that worker (re)starts, so they are dead."""
    count = 0
    for model in job_models():
        for job in model.objects.filter(status=JobStatus.RUNNING, worker=worker):
            if job.fail(reason):
                job.on_failed(reason)
                count += 1
    return count


def recover_stale(alive_workers: set[str], grace: timedelta) -> int:
    """Fail running rows whose worker sends no heartbeat and that reported nothing within ``grace``."""
    count = 0
    cutoff = timezone.now() - grace
    for model in job_models():
        stale = model.objects.filter(status=JobStatus.RUNNING, heartbeat_at__lt=cutoff).exclude(
            worker__in=alive_workers
        )
        for job in stale:
            reason = f"The worker {job.worker or '?'} stopped responding while running this job."
            if job.fail(reason):
                job.on_failed(reason)
                count += 1
    return count
