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
from appliance.api import require
from models_catalog.forms import EndpointForm, parse_patterns
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


class CopyOut(Schema):
    node: str
    status: str
    commit: str
    current: bool  # at the model's commit: usable on that box
    error: str


class ModelDetailOut(ModelOut):
    facts: dict
    files: list[FileOut]
    copies: list[CopyOut]
    active_job: JobOut | None


class DownloadIn(Schema):
    repo_id: str = Field(..., max_length=200)
    revision: str = Field("main", max_length=200, pattern=r"^[\w.\-/]+$")
    endpoint_id: int | None = Field(None, description="Id of a configured source (``/sources``); none for HF_ENDPOINT.")
    endpoint: str | None = Field(None, description="Or the source's name.")
    allow_patterns: list[str] = []
    ignore_patterns: list[str] = []


class ImportIn(Schema):
    directory: str = Field(..., max_length=1000)
    repo_id: str = Field(..., max_length=200)
    replace: bool = Field(False, description="Replace the files of a model of this name (none may use it).")


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
        "copies": [
            {"node": c.node, "status": c.status, "commit": c.commit, "current": c.usable, "error": c.error}
            for c in model.copies.all()
        ],
        "active_job": model.active_job(),
    }


@router.get("/models", response=list[ModelOut], summary="Models on this appliance")
def list_models(request: HttpRequest, filters: Query[ModelFilter]) -> Any:
    require(request, "model.view")
    models = LocalModel.objects.all()
    if filters.q:
        models = models.filter(repo_id__icontains=filters.q)
    if filters.status:
        models = models.filter(status=filters.status)
    return models


@router.post("/models", response={202: JobOut}, summary="Download a model (or resume a failed download)")
def create_download(request: HttpRequest, payload: DownloadIn) -> Status:
    require(request, "model.manage", action="model.download")
    endpoint = None
    if payload.endpoint_id is not None:
        endpoint = HubEndpoint.objects.filter(pk=payload.endpoint_id).first()
        if endpoint is None:
            raise HttpError(422, f"No source with id {payload.endpoint_id}.")
    elif payload.endpoint:
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
    require(request, "model.manage", action="model.import")
    try:
        job = LocalModel.request_import(payload.directory, payload.repo_id, request.user, replace=payload.replace)
    except (UnsafePath, ImportRefused) as exc:
        raise HttpError(422, str(exc)) from None
    except JobConflict as exc:
        raise HttpError(409, str(exc)) from None
    audit.record(request, "model.import", job.model, detail={"via": "api", "directory": payload.directory})
    return Status(202, job)


@router.get("/models/{model_id}", response=ModelDetailOut, summary="A model with its files and facts")
def get_model(request: HttpRequest, model_id: int) -> Any:
    require(request, "model.view")
    return _detail(get_object_or_404(LocalModel, pk=model_id))


@router.get("/models/{model_id}/estimate", summary="GPU memory for a context length and concurrency")
def get_estimate(request: HttpRequest, model_id: int, query: Query[EstimateQuery]) -> dict[str, int]:
    require(request, "model.view")
    model = get_object_or_404(LocalModel, pk=model_id)
    try:
        return estimate(model.facts(), query.context_length, query.concurrency)
    except ValueError as exc:
        raise HttpError(422, str(exc)) from None


@router.get("/models/{model_id}/jobs", response=list[JobOut], summary="The model's jobs, newest first")
def model_jobs(request: HttpRequest, model_id: int) -> Any:
    require(request, "model.view")
    return get_object_or_404(LocalModel, pk=model_id).jobs.all()[:100]


def _start(request: HttpRequest, model_id: int, kind: str) -> Status:
    require(request, "model.manage", action=f"model.{kind}")
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


@router.post(
    "/models/{model_id}/resume",
    response={202: JobOut},
    summary="Fetch a failed model again (download resumed, or import redone)",
)
def resume_model(request: HttpRequest, model_id: int) -> Status:
    require(request, "model.manage", action="model.resume")
    model = get_object_or_404(LocalModel, pk=model_id)
    try:
        job = model.resume(request.user)
    except (UnsafePath, ImportRefused) as exc:
        raise HttpError(422, str(exc)) from None
    except JobConflict as exc:
        raise HttpError(409, str(exc)) from None
    audit.record(request, "model.resume", model, detail={"via": "api"})
    return Status(202, job)


@router.delete("/models/{model_id}", response={202: JobOut}, summary="Delete a model (refused while in use)")
def delete_model(request: HttpRequest, model_id: int) -> Status:
    return _start(request, model_id, ModelJob.Kind.DELETE)


@router.get("/model-jobs/{job_id}", response=JobOut, summary="A model job's progress")
def get_job(request: HttpRequest, job_id: int) -> Any:
    require(request, "model.view")
    return get_object_or_404(ModelJob, pk=job_id)


@router.post("/model-jobs/{job_id}/cancel", response=JobOut, summary="Cancel a job (a download can resume later)")
def cancel_job(request: HttpRequest, job_id: int) -> Any:
    require(request, "model.manage", action="model.job_cancel")
    job = get_object_or_404(ModelJob, pk=job_id)
    if not job.cancel():
        raise HttpError(409, "The job has already finished.")
    audit.record(request, "model.job_cancel", job.model, detail={"via": "api", "job": job.pk})
    return job


class RemoteCodeIn(Schema):
    allow: bool


@router.post("/models/{model_id}/check", response={202: None}, summary="Ask the source for the latest commit")
def check_model(request: HttpRequest, model_id: int) -> Status:
    require(request, "model.manage", action="model.check")
    model = get_object_or_404(LocalModel, pk=model_id)
    from models_catalog.tasks import check_model as check_task

    check_task.delay(model.pk)
    audit.record(request, "model.check", model, detail={"via": "api"})
    return Status(202, None)


@router.post("/models/{model_id}/remote-code", response=ModelOut, summary="Allow or forbid --trust-remote-code")
def allow_remote_code(request: HttpRequest, model_id: int, payload: RemoteCodeIn) -> Any:
    require(request, "model.allow_remote_code")
    model = get_object_or_404(LocalModel, pk=model_id)
    LocalModel.objects.filter(pk=model.pk).update(allow_remote_code=payload.allow)
    audit.record(request, "model.allow_remote_code", model, detail={"allowed": payload.allow, "via": "api"})
    model.refresh_from_db()
    return model


# --- sources (hub endpoints) -----------------------------------------------------------------------


class SourceOut(Schema):
    id: int
    name: str
    url: str
    kind: str
    has_token: bool
    created_at: datetime


class SourceIn(Schema):
    name: str
    url: str
    kind: str = HubEndpoint.Kind.HUB
    token: str = Field("", description="Stored encrypted, never returned; empty keeps the current one.")


def _save_source(request: HttpRequest, payload: SourceIn, instance: HubEndpoint | None) -> HubEndpoint:
    form = EndpointForm(payload.dict(), instance=instance)
    if not form.is_valid():
        raise HttpError(422, "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
    endpoint = form.save()
    detail = {"url": endpoint.url, "token_changed": bool(form.cleaned_data.get("token")), "via": "api"}
    audit.record(request, "hub_endpoint.update" if instance else "hub_endpoint.create", endpoint, detail=detail)
    return endpoint


@router.get("/sources", response=list[SourceOut], summary="Where models are downloaded from")
def list_sources(request: HttpRequest) -> Any:
    require(request, "model.view")
    return HubEndpoint.objects.all()


@router.post("/sources", response={201: SourceOut}, summary="Add a source (appliance admin)")
def create_source(request: HttpRequest, payload: SourceIn) -> Status:
    require(request, "hub_endpoint.manage", action="hub_endpoint.create")
    return Status(201, _save_source(request, payload, None))


@router.put("/sources/{source_id}", response=SourceOut, summary="Change a source (appliance admin)")
def update_source(request: HttpRequest, source_id: int, payload: SourceIn) -> Any:
    require(request, "hub_endpoint.manage", action="hub_endpoint.update")
    return _save_source(request, payload, get_object_or_404(HubEndpoint, pk=source_id))


@router.delete("/sources/{source_id}", response={204: None}, summary="Remove an unused source (appliance admin)")
def delete_source(request: HttpRequest, source_id: int) -> Status:
    require(request, "hub_endpoint.manage", action="hub_endpoint.delete")
    endpoint = get_object_or_404(HubEndpoint, pk=source_id)
    if endpoint.models.exists():
        raise HttpError(409, "Models were downloaded from this source; delete them first.")
    audit.record(request, "hub_endpoint.delete", endpoint, detail={"via": "api"})
    endpoint.delete()
    return Status(204, None)
