"""Running a model job in the command's own process, printing its progress."""

from __future__ import annotations

import threading

from django.core.management.base import CommandError, OutputWrapper

from appliance.jobs import JobStatus, run_job
from models_catalog.models import ModelJob
from models_catalog.tasks import model_job_body


def run_in_foreground(job: ModelJob, stdout: OutputWrapper) -> None:
    """Run ``job`` here; print progress every second; raise CommandError if it does not succeed."""
    done = threading.Event()

    def show() -> None:
        from django.db import connection

        while not done.wait(1.0):
            row = ModelJob.objects.get(pk=job.pk)
            detail = row.progress_detail
            stdout.write(
                f"  {row.percent:3d}%  {detail.get('files_done', 0)}/{detail.get('files_total', '?')} files  "
                f"{detail.get('bytes_done', 0):,} bytes"
            )
        connection.close()

    watcher = threading.Thread(target=show, daemon=True)
    watcher.start()
    try:
        status = run_job(ModelJob, job.pk, model_job_body, worker="manage.py")
    finally:
        done.set()
        watcher.join()
    job.refresh_from_db()
    if status != JobStatus.SUCCEEDED:
        raise CommandError(f"{job}: {status}. {job.error}")
    stdout.write(f"{job}: done.")
