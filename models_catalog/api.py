"""Model catalog resources of the management API (``/api/v1/models``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from ninja import Field, Query, Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status

from appliance import audit
from appliance.api import admin_required
from models_catalog.forms import parse_patterns
from models_catalog.importer import ImportRefused
from models_catalog.layout import UnsafePath
from models_catalog.memory import estimate
from models_catalog.models import HubEndpoint, JobConflict, LocalModel, ModelJob

router = Router(tags=["models"])


class JobOut(Schema):
    id: int
    kind: str
    status: str
    progress: float
    detail: dict = Field(alias="progress_detail")
    error: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ModelOut(Schema):
    id: int
    repo_id: str
    revision: str
    commit: str
    upstream_commit: str
    changed_files: list
    source: str
    node: str
    status: str
    error: str
    size_bytes: int
    parameter_count: int | None
    last_checked_at: datetime | None


class FileOut(Schema):
    path: str
    size: int
    sha256: str
    blob_id: str
    is_lfs: bool


class ModelDetailOut(ModelOut):
    facts: dict
    files: list[FileOut]
    active_job: JobOut | None


class DownloadIn(Schema):
    repo_id: str = Field(..., max_length=200)
    revision: str = Field("main", max_length=200, pattern=r"^[\w.\-/]+$")
    endpoint: str | None = Field(None, description="Name of a configured source; empty for HF_ENDPOINT.")
    allow_patterns: list[str] = []
    ignore_patterns: list[str] = []


class ImportIn(Schema):
    directory: str = Field(..., max_length=1000)
    repo_id: str = Field(..., max_length=200)


class EstimateQuery(Schema):
    context_length: int = Field(..., ge=1, le=10_000_000)
    concurrency: int = Field(1, ge=1, le=100_000)


class ModelFilter(Schema):
    q: str | None = Field(None, max_length=200)
    status: LocalModel.Status | None = None


def _detail(model: LocalModel) -> dict[str, Any]:
    return {
        **{field: getattr(model, field) for field in ModelOut.model_fields},
        "facts": model.facts(),
        "files": list(model.files.all()),
        "active_job": model.active_job(),
    }


@router.get("/models", response=list[ModelOut], summary="Models on this appliance")
def list_models(request: HttpRequest, filters: Query[ModelFilter]) -> Any:
    models = LocalModel.objects.all()
    if filters.q:
        models = models.filter(repo_id__icontains=filters.q)
    if filters.status:
        models = models.filter(status=filters.status)
    return models


@router.post("/models", response={202: JobOut}, summary="Download a model (or resume a failed download)")
def create_download(request: HttpRequest, payload: DownloadIn) -> Status:
    admin_required(request, "model.download")
    endpoint = None
    if payload.endpoint:
        endpoint = HubEndpoint.objects.filter(name=payload.endpoint).first()
        if endpoint is None:
            raise HttpError(422, f"No source named {payload.endpoint!r}.")
    try:
        allow = parse_patterns("\n".join(payload.allow_patterns))
        ignore = parse_patterns("\n".join(payload.ignore_patterns))
        job = LocalModel.request_download(payload.repo_id, payload.revision, endpoint, allow, ignore, user=request.user)
    except UnsafePath as exc:
        raise HttpError(422, str(exc)) from None
    except ValidationError as exc:
        raise HttpError(422, " ".join(exc.messages)) from None
    except JobConflict as exc:
        raise HttpError(409, str(exc)) from None
    audit.record(request, "model.download", job.model, detail={"via": "api"})
    return Status(202, job)


@router.post("/models/import", response={202: JobOut}, summary="Import a model from a local directory")
def create_import(request: HttpRequest, payload: ImportIn) -> Status:
    admin_required(request, "model.import")
    try:
        job = LocalModel.request_import(payload.directory, payload.repo_id, request.user)
    except (UnsafePath, ImportRefused) as exc:
        raise HttpError(422, str(exc)) from None
    except JobConflict as exc:
        raise HttpError(409, str(exc)) from None
    audit.record(request, "model.import", job.model, detail={"via": "api", "directory": payload.directory})
    return Status(202, job)


@router.get("/models/{model_id}", response=ModelDetailOut, summary="A model with its files and facts")
def get_model(request: HttpRequest, model_id: int) -> Any:
    return _detail(get_object_or_404(LocalModel, pk=model_id))


@router.get("/models/{model_id}/estimate", summary="GPU memory for a context length and concurrency")
def get_estimate(request: HttpRequest, model_id: int, query: Query[EstimateQuery]) -> dict[str, int]:
    model = get_object_or_404(LocalModel, pk=model_id)
    try:
        return estimate(model.facts(), query.context_length, query.concurrency)
    except ValueError as exc:
        raise HttpError(422, str(exc)) from None


@router.get("/models/{model_id}/jobs", response=list[JobOut], summary="The model's jobs, newest first")
def model_jobs(request: HttpRequest, model_id: int) -> Any:
    return get_object_or_404(LocalModel, pk=model_id).jobs.all()[:100]


def _start(request: HttpRequest, model_id: int, kind: str) -> Status:
    admin_required(request, f"model.{kind}")
    model = get_object_or_404(LocalModel, pk=model_id)
    try:
        job = (
            model.request_delete(request.user) if kind == ModelJob.Kind.DELETE else model.start_job(kind, request.user)
        )
    except JobConflict as exc:
        raise HttpError(409, str(exc)) from None
    audit.record(request, f"model.{kind}", model, detail={"via": "api"})
    return Status(202, job)


@router.post("/models/{model_id}/update", response={202: JobOut}, summary="Update an outdated model")
def update_model(request: HttpRequest, model_id: int) -> Status:
    return _start(request, model_id, ModelJob.Kind.UPDATE)


@router.post("/models/{model_id}/verify", response={202: JobOut}, summary="Re-check every file's digest")
def verify_model(request: HttpRequest, model_id: int) -> Status:
    return _start(request, model_id, ModelJob.Kind.VERIFY)


@router.delete("/models/{model_id}", response={202: JobOut}, summary="Delete a model (refused while in use)")
def delete_model(request: HttpRequest, model_id: int) -> Status:
    return _start(request, model_id, ModelJob.Kind.DELETE)


@router.get("/model-jobs/{job_id}", response=JobOut, summary="A model job's progress")
def get_job(request: HttpRequest, job_id: int) -> Any:
    return get_object_or_404(ModelJob, pk=job_id)


@router.post("/model-jobs/{job_id}/cancel", response=JobOut, summary="Cancel a job (a download can resume later)")
def cancel_job(request: HttpRequest, job_id: int) -> Any:
    admin_required(request, "model.job_cancel")
    job = get_object_or_404(ModelJob, pk=job_id)
    if not job.cancel():
        raise HttpError(409, "The job has already finished.")
    audit.record(request, "model.job_cancel", job.model, detail={"via": "api", "job": job.pk})
    return job
