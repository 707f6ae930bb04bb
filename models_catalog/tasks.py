"""Celery tasks of the model catalog: thin wrappers that run a job row's body."""

from __future__ import annotations

import shutil
from pathlib import Path

from celery import shared_task

from appliance.jobs import run_job
from models_catalog import copies
from models_catalog.download import download
from models_catalog.importer import import_directory
from models_catalog.models import LocalModel, ModelJob
from models_catalog.sync import check_for_update, source_for, verify_ready_copy


def model_job_body(job: ModelJob) -> None:
    model = job.model
    if model is None:
        raise RuntimeError("The model of this job was deleted.")
    if job.kind in (ModelJob.Kind.DOWNLOAD, ModelJob.Kind.UPDATE):
        download(job, source_for(model))
    elif job.kind == ModelJob.Kind.IMPORT:
        import_directory(job, Path(model.import_path))
    elif job.kind == ModelJob.Kind.VERIFY:
        problems = verify_ready_copy(job)
        if problems:
            raise RuntimeError("Verification failed: " + "; ".join(problems[:20]))
    elif job.kind == ModelJob.Kind.SYNC:
        copies.sync(job)
    elif job.kind == ModelJob.Kind.DELETE:
        if model.directory.exists():
            shutil.rmtree(model.directory)
        for node in model.copies.values_list("node", flat=True):  # each box removes its own copy
            drop_copy.apply_async(args=[model.repo_id], queue=f"node.{node}")
        model.remove_row()  # archived while deleted deployments kept for past bills name it
    else:
        raise RuntimeError(f"Unknown job kind {job.kind!r}")


@shared_task(name="models_catalog.run_model_job", bind=True, acks_late=True)
def run_model_job(self, job_id: int) -> str:
    return run_job(ModelJob, job_id, model_job_body, worker=self.request.hostname or "")


def _check(model: LocalModel) -> int | None:
    """Changed files of one model, or None when its source could not be asked (recorded on it)."""
    try:
        return len(check_for_update(model))
    except Exception as exc:  # one unreachable source must not stop the others; the admin sees why
        LocalModel.objects.filter(pk=model.pk).update(error=f"Update check failed: {exc}")
        return None


@shared_task(name="models_catalog.check_updates")
def check_updates() -> dict[str, int]:
    """Ask each model's source whether its tracked branch moved (imported models have none)."""
    results = [
        _check(model)
        for model in LocalModel.objects.filter(status__in=list(LocalModel.USABLE)).exclude(
            source=LocalModel.Source.IMPORTED
        )
    ]
    return {
        "checked": len(results),
        "outdated": sum(1 for r in results if r),
        "failed": sum(1 for r in results if r is None),
    }


@shared_task(name="models_catalog.check_model")
def check_model(model_id: int) -> int:
    """Check one model for an update now (the Check button); returns the number of changed files."""
    model = LocalModel.objects.filter(pk=model_id).first()
    if model is None or model.source == LocalModel.Source.IMPORTED:
        return 0
    return _check(model) or 0


@shared_task(name="models_catalog.drop_copy", ignore_result=True)
def drop_copy(repo_id: str) -> None:
    """Remove this box's copy of a deleted model (waits in this box's queue while it is away)."""
    copies.drop(repo_id)
