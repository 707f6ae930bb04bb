"""Keeping models current: ask the source for the tracked branch's commit, list what changed,
and re-check a ready copy's files against the digests it was verified with."""

from __future__ import annotations

from django.conf import settings
from django.utils import timezone

from models_catalog.download import select_files
from models_catalog.hashing import file_digests
from models_catalog.layout import inside
from models_catalog.models import HubEndpoint, LocalModel, ModelJob
from models_catalog.source import HubSource, ModelSource


def source_for(model: LocalModel) -> ModelSource:
    """The source a model is fetched from: its endpoint, or the HF_ENDPOINT setting."""
    endpoint: HubEndpoint | None = model.endpoint
    if endpoint is None:
        return HubSource(settings.HF_ENDPOINT)
    return HubSource(endpoint.url, endpoint.token())


def check_for_update(model: LocalModel, source: ModelSource | None = None) -> list[dict[str, str]]:
    """Mark the model outdated if its branch moved; returns the changed files (empty if current)."""
    source = source or source_for(model)
    snapshot = source.snapshot(model.repo_id, model.revision)
    LocalModel.objects.filter(pk=model.pk).update(last_checked_at=timezone.now())
    if snapshot.commit == model.commit:
        return []
    remote = {f.path: f for f in select_files(snapshot.files, model.allow_patterns, model.ignore_patterns)}
    local = {f.path: f for f in model.files.all()}
    changes: list[dict[str, str]] = []
    for path in sorted(set(remote) | set(local)):
        if path not in local:
            changes.append({"path": path, "change": "added"})
        elif path not in remote:
            changes.append({"path": path, "change": "removed"})
        else:
            new, old = remote[path], local[path]
            if new.size != old.size or new.blob_id != old.blob_id or (new.sha256 and new.sha256 != old.sha256):
                changes.append({"path": path, "change": "modified"})
    LocalModel.objects.filter(pk=model.pk, status=LocalModel.Status.READY).update(status=LocalModel.Status.OUTDATED)
    LocalModel.objects.filter(pk=model.pk).update(upstream_commit=snapshot.commit, changed_files=changes)
    return changes


def verify_ready_copy(job: ModelJob) -> list[str]:
    """Re-hash every file of the ready copy; returns the problems found (empty when intact)."""
    model = job.model
    assert model is not None
    files = list(model.files.all())
    problems: list[str] = []
    total = sum(f.size for f in files) or 1
    done = 0
    for file in files:
        path = inside(model.ready_path, file.path)
        if not path.is_file():
            problems.append(f"{file.path}: missing")
        else:
            sha256, blob_id = file_digests(path)
            size = path.stat().st_size
            if size != file.size:
                problems.append(f"{file.path}: size {size} bytes, expected {file.size}")
            elif sha256 != file.sha256 or (not file.is_lfs and blob_id != file.blob_id):
                problems.append(f"{file.path}: content does not match its recorded digest")
        done += file.size
        job.report(done / total, files_done=files.index(file) + 1, files_total=len(files))
    return problems
