"""Deployments and engine runtimes in the management API (``/api/v1/deployments``, ``/api/v1/runtimes``).

Deployments are named by id (as departments' and keys' ``deployment_ids`` name them); department roles
see only the deployments their departments may use. Rules: ``appliance.roles`` via ``require``."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from django.db import transaction
from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from ninja import Field, Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status
from pydantic import StrictInt

from appliance import audit
from appliance.api import require
from gpus.charts import RANGES
from provisioning import engine_metrics, scheduler, targets
from provisioning.forms import DeployForm, TargetsForm
from provisioning.models import Deployment, DeploymentBusy, EngineRuntime, RuntimeJob
from provisioning.placement import PlacementRefused
from provisioning.runtimes import request_install

router = Router(tags=["deployments"])


class PartOut(Schema):
    rank: int
    node: str
    state: str
    pid: int | None


class ReplicaOut(Schema):
    ordinal: int
    node: str
    parts: list[PartOut] = Field(alias="part_list")
    state: str
    port: int | None
    pid: int | None
    gpu_ids: list
    restart_count: int
    last_error: str
    ready_at: datetime | None


class DeploymentOut(Schema):
    id: int
    name: str
    model_id: int
    runtime_id: int
    model: str = Field(alias="model.repo_id")
    runtime: str = Field(alias="runtime.name")
    node: str
    any_node: bool
    nodes_per_replica: int
    pipeline_parallel: int
    replicas: int
    desired: str
    state: str
    gpu_memory_fraction: float
    max_model_len: int | None
    extra_args: list
    target_ttft_p99_ms: int | None
    target_itl_p99_ms: int | None
    target_max_waiting: int | None
    target_kv_cache_percent: int | None
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
    any_node: bool = False
    nodes_per_replica: int = 1
    pipeline_parallel: int = 1


class ScaleIn(Schema):
    replicas: int = Field(..., ge=0, le=16)


def _kick() -> None:
    from provisioning.views import _kick as kick

    kick()


def _out(deployment: Deployment) -> Deployment:
    deployment.replica_list = list(deployment.replica_set.prefetch_related("parts"))
    for replica in deployment.replica_list:
        replica.part_list = list(replica.parts.all())
    deployment.state = deployment.state()
    return deployment


@router.get("/deployments", response=list[DeploymentOut], summary="Deployments and their replicas")
def list_deployments(request: HttpRequest) -> Any:
    require(request, "deployment.view")
    return [_out(d) for d in Deployment.objects.visible_to(request.user).select_related("model", "runtime")]


def _deployment(request: HttpRequest, deployment_id: int) -> Deployment:
    """The deployment if the caller may see it; 404 otherwise (whether it exists or not)."""
    visible = Deployment.objects.visible_to(request.user).select_related("model", "runtime")
    return get_object_or_404(visible, pk=deployment_id)


def _managed(request: HttpRequest, deployment_id: int, action: str) -> Deployment:
    deployment = _deployment(request, deployment_id)
    require(request, "deployment.manage", action=action)
    return deployment


class EngineSeriesOut(Schema):
    label: str
    points: list[tuple[int, float]] = Field(..., description="[epoch milliseconds, value]")


class EngineChartOut(Schema):
    unit: str
    series: list[EngineSeriesOut]


# The choices the page offers, from the same tables (a wrong one is a 422 naming the choices).
ChartName = Literal[tuple(engine_metrics.CHARTS)]  # type: ignore[valid-type]
RangeName = Literal[tuple(RANGES)]  # type: ignore[valid-type]


@router.get("/deployments/{deployment_id}/engine-metrics", response=EngineChartOut,
            summary="One engine-metrics chart of a deployment (what its engines report), per replica")  # fmt: skip
def deployment_engine_metrics(
    request: HttpRequest, deployment_id: int, chart: ChartName = "requests", range: RangeName = "1h"
) -> Any:
    require(request, "deployment.view")
    return engine_metrics.series(_deployment(request, deployment_id), range, chart)


@router.get("/deployments/{deployment_id}", response=DeploymentOut, summary="One deployment")
def get_deployment(request: HttpRequest, deployment_id: int) -> Any:
    require(request, "deployment.view")
    return _out(_deployment(request, deployment_id))


@router.post("/deployments", response={201: DeploymentOut}, summary="Deploy a ready model")
def create_deployment(request: HttpRequest, payload: DeployIn) -> Status:
    require(request, "deployment.manage", action="deployment.create")
    data = payload.dict()
    runtime_id = data.pop("runtime_id") or getattr(EngineRuntime.objects.filter(status="ready").first(), "pk", None)
    form = DeployForm({**data, "model": data.pop("model_id"), "runtime": runtime_id})
    if not form.is_valid():
        raise HttpError(422, "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
    deployment = Deployment.from_form(form.cleaned_data, request.user)
    try:
        scheduler.check(deployment)
    except PlacementRefused as exc:
        raise HttpError(422, str(exc)) from None
    with transaction.atomic():
        deployment.save()
        audit.record(request, "deployment.create", deployment, detail={"via": "api"})
    _kick()
    return Status(201, _out(deployment))


@router.post("/deployments/{deployment_id}/scale", response=DeploymentOut, summary="Set the number of replicas")
def scale(request: HttpRequest, deployment_id: int, payload: ScaleIn) -> Any:
    deployment = _managed(request, deployment_id, "deployment.scale")
    Deployment.objects.filter(pk=deployment.pk).update(replicas=payload.replicas)
    audit.record(request, "deployment.scale", deployment, detail={"replicas": payload.replicas, "via": "api"})
    _kick()
    deployment.refresh_from_db()
    return _out(deployment)


class TargetsIn(Schema):
    """Every target, as on the page: null (or left out) means no target."""

    target_ttft_p99_ms: StrictInt | None = None
    target_itl_p99_ms: StrictInt | None = None
    target_max_waiting: StrictInt | None = None
    target_kv_cache_percent: StrictInt | None = None


class TargetAlertOut(Schema):
    id: int
    target: str
    value: float
    limit: float
    opened_at: datetime
    last_seen_at: datetime
    occurrences: int
    resolved_at: datetime | None
    acknowledged_at: datetime | None


@router.put("/deployments/{deployment_id}/targets", response=DeploymentOut,
            summary="Set the deployment's service targets")  # fmt: skip
def set_targets(request: HttpRequest, deployment_id: int, payload: TargetsIn) -> Any:
    deployment = _managed(request, deployment_id, "deployment.targets")
    form = TargetsForm({k: "" if v is None else v for k, v in payload.dict().items()}, instance=deployment)
    if not form.is_valid():
        raise HttpError(400, "; ".join(f"{field}: {' '.join(errors)}" for field, errors in form.errors.items()))
    form.save()
    audit.record(request, "deployment.targets", deployment, detail={**form.cleaned_data, "via": "api"})
    return _out(deployment)


@router.get("/deployments/{deployment_id}/target-alerts", response=list[TargetAlertOut],
            summary="The deployment's target alerts, newest first")  # fmt: skip
def target_alerts(request: HttpRequest, deployment_id: int) -> Any:
    require(request, "deployment.view")
    return list(_deployment(request, deployment_id).target_alerts.all()[:100])


@router.post("/deployments/{deployment_id}/target-alerts/acknowledge", response=dict,
             summary="Acknowledge the deployment's open target alerts")  # fmt: skip
def acknowledge_target_alerts(request: HttpRequest, deployment_id: int) -> Any:
    deployment = _managed(request, deployment_id, "deployment.acknowledge")
    count = targets.acknowledge_open(deployment, request.user)
    audit.record(request, "deployment.acknowledge", deployment, detail={"alerts": count, "via": "api"})
    return {"acknowledged": count}


@router.post("/deployments/{deployment_id}/stop", response=DeploymentOut, summary="Stop every replica")
def stop(request: HttpRequest, deployment_id: int) -> Any:
    deployment = _managed(request, deployment_id, "deployment.stop")
    Deployment.objects.filter(pk=deployment.pk).update(desired=Deployment.Desired.STOPPED)
    audit.record(request, "deployment.stop", deployment, detail={"via": "api"})
    _kick()
    deployment.refresh_from_db()
    return _out(deployment)


@router.post("/deployments/{deployment_id}/start", response=DeploymentOut, summary="Run it again")
def start(request: HttpRequest, deployment_id: int) -> Any:
    deployment = _managed(request, deployment_id, "deployment.start")
    deployment.run()
    audit.record(request, "deployment.start", deployment, detail={"via": "api"})
    _kick()
    deployment.refresh_from_db()
    return _out(deployment)


@router.post(
    "/deployments/{deployment_id}/restart", response=DeploymentOut, summary="Run it; failed replicas get another try"
)
def restart(request: HttpRequest, deployment_id: int) -> Any:
    deployment = _managed(request, deployment_id, "deployment.restart")
    deployment.run(retry_failed=True)
    audit.record(request, "deployment.restart", deployment, detail={"via": "api"})
    _kick()
    deployment.refresh_from_db()
    return _out(deployment)


@router.delete(
    "/deployments/{deployment_id}",
    response={204: None},
    summary="Delete a stopped deployment; archived instead while usage refers to it",
    description="Refused (409) until it is stopped and its replicas are. A deployment that past usage or "
    "GPU-hours refer to is archived, not deleted (``Deployment.remove``, as on its page): it leaves the "
    "lists, departments and keys, but past usage, CSV exports and chargeback stay as they were.",
)
def delete(request: HttpRequest, deployment_id: int) -> Status:
    deployment = _managed(request, deployment_id, "deployment.delete")
    try:
        outcome = deployment.remove()
    except DeploymentBusy as exc:
        raise HttpError(409, str(exc)) from None
    audit.record(request, "deployment.delete", deployment, detail={"outcome": outcome, "via": "api"})
    return Status(204, None)


# --- engine runtimes -------------------------------------------------------------------------------


class RuntimeOut(Schema):
    id: int
    node: str
    name: str
    package: str
    version: str
    status: str
    error: str
    checked_at: datetime | None


class RuntimeJobOut(Schema):
    id: int
    runtime_id: int
    status: str
    progress: float
    error: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@router.get("/runtimes", response=list[RuntimeOut], summary="Engine runtimes installed on the nodes")
def list_runtimes(request: HttpRequest) -> Any:
    require(request, "runtime.view")
    return EngineRuntime.objects.all()


@router.post("/runtimes/install", response={202: RuntimeJobOut}, summary="Install the engine for this box")
def install_runtime(request: HttpRequest) -> Status:
    require(request, "runtime.install", action="engine.install")
    if RuntimeJob.objects.filter(status__in=["queued", "running"]).exists():
        raise HttpError(409, "An engine is being installed already.")
    job = request_install(user=request.user)
    audit.record(request, "engine.install", job.runtime, detail={"via": "api"})
    return Status(202, job)
