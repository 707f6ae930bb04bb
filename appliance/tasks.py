"""Celery tasks of the project itself."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task

from appliance import worker
from appliance.jobs import recover_stale


@shared_task(name="appliance.tasks.recover_stale_jobs")
def recover_stale_jobs() -> int:
    """Fail jobs whose worker died without coming back (its restart would have done it)."""
    from django.conf import settings

    grace = timedelta(seconds=max(settings.WORKER_HEARTBEAT_SECONDS * 6, 30))
    return recover_stale(set(worker.alive_workers()), grace)


@shared_task(name="appliance.tasks.scheduled_backup")
def scheduled_backup() -> str:
    """The periodic backup (BACKUP_INTERVAL_HOURS); its outcome is a Backup row the Overview shows."""
    from appliance.models import Backup

    return Backup.run(Backup.Trigger.SCHEDULED).status
