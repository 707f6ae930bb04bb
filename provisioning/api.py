"""Deployments in the management API (``/api/v1/deployments``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import transaction
from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from ninja import Field, Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status

from appliance import audit
from appliance.api import admin_required
from provisioning.forms import DeployForm
from provisioning.models import Deployment, EngineRuntime
from provisioning.placement import PlacementRefused, place

router = Router(tags=["deployments"])


class ReplicaOut(Schema):
    ordinal: int
    node: str
    state: str
    port: int | None
    pid: int | None
    gpu_ids: list
    restart_count: int
    last_error: str
    ready_at: datetime | None


class DeploymentOut(Schema):
    name: str
    model: str = Field(alias="model.repo_id")
    runtime: str = Field(alias="runtime.name")
    node: str
    replicas: int
    desired: str
    state: str
    gpu_memory_fraction: float
    max_model_len: int | None
    extra_args: list
    replica_states: list[ReplicaOut] = Field(alias="replica_list")


class DeployIn(Schema):
    model_id: int
    name: str
    runtime_id: int | None = None
    replicas: int = 1
    tensor_parallel: int = 1
    gpu_ids: str = ""
    gpu_memory_fraction: float = 0.9
    max_model_len: int | None = None
    extra_args: str = ""


class ScaleIn(Schema):
    replicas: int = Field(..., ge=0, le=16)


def _out(deployment: Deployment) -> Deployment:
    deployment.replica_list = list(deployment.replica_set.all())
    deployment.state = deployment.state()
    return deployment


@router.get("/deployments", response=list[DeploymentOut], summary="Deployments and their replicas")
def list_deployments(request: HttpRequest) -> Any:
    return [_out(d) for d in Deployment.objects.select_related("model", "runtime")]


@router.get("/deployments/{name}", response=DeploymentOut, summary="One deployment")
def get_deployment(request: HttpRequest, name: str) -> Any:
    return _out(get_object_or_404(Deployment.objects.select_related("model", "runtime"), name=name))


@router.post("/deployments", response={201: DeploymentOut}, summary="Deploy a ready model")
def create_deployment(request: HttpRequest, payload: DeployIn) -> Status:
    admin_required(request, "deployment.create")
    data = payload.dict()
    runtime_id = data.pop("runtime_id") or getattr(EngineRuntime.objects.filter(status="ready").first(), "pk", None)
    form = DeployForm({**data, "model": data.pop("model_id"), "runtime": runtime_id})
    if not form.is_valid():
        raise HttpError(422, "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
    deployment = Deployment.from_form(form.cleaned_data, request.user)
    try:
        place(deployment)
    except PlacementRefused as exc:
        raise HttpError(422, str(exc)) from None
    with transaction.atomic():
        deployment.save()
        audit.record(request, "deployment.create", deployment, detail={"via": "api"})
    from provisioning.views import _kick

    _kick()
    return Status(201, _out(deployment))


@router.post("/deployments/{name}/scale", response=DeploymentOut, summary="Set the number of replicas")
def scale(request: HttpRequest, name: str, payload: ScaleIn) -> Any:
    admin_required(request, "deployment.scale")
    deployment = get_object_or_404(Deployment, name=name)
    Deployment.objects.filter(pk=deployment.pk).update(replicas=payload.replicas)
    audit.record(request, "deployment.scale", deployment, detail={"replicas": payload.replicas, "via": "api"})
    deployment.refresh_from_db()
    return _out(deployment)


@router.post("/deployments/{name}/stop", response=DeploymentOut, summary="Stop every replica")
def stop(request: HttpRequest, name: str) -> Any:
    admin_required(request, "deployment.stop")
    deployment = get_object_or_404(Deployment, name=name)
    Deployment.objects.filter(pk=deployment.pk).update(desired=Deployment.Desired.STOPPED)
    audit.record(request, "deployment.stop", deployment, detail={"via": "api"})
    deployment.refresh_from_db()
    return _out(deployment)


@router.post("/deployments/{name}/start", response=DeploymentOut, summary="Run it again; failed replicas retry")
def start(request: HttpRequest, name: str) -> Any:
    admin_required(request, "deployment.start")
    deployment = get_object_or_404(Deployment, name=name)
    deployment.run(retry_failed=True)
    audit.record(request, "deployment.start", deployment, detail={"via": "api"})
    deployment.refresh_from_db()
    return _out(deployment)
