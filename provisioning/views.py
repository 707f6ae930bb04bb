"""Deployments pages: list with engine runtimes, the deploy form, a deployment's live page."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.db import IntegrityError, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from appliance import audit
from appliance.archiving import ARCHIVED
from appliance.roles import can, requires
from gpus.charts import RANGES
from models_catalog.models import LocalModel
from provisioning import capacity, engine_metrics, launcher, scheduler, targets
from provisioning.forms import DeployForm, ScaleForm, TargetsForm, recommended
from provisioning.models import Deployment, DeploymentBusy, EngineRuntime, Replica, RuntimeJob
from provisioning.placement import PlacementRefused
from provisioning.runtimes import request_install
from tenancy.reports import tokens_by_model


def gpu_alerts(replicas: list[Replica]) -> list:
    """Open alerts of the GPUs the replicas run on, shown on the deployment page."""
    from django.db.models import Q

    from gpus.models import Alert

    wanted = Q(pk__in=[])
    for replica in replicas:
        if replica.gpu_ids and replica.state not in Replica.TERMINAL:
            wanted |= Q(gpu__node=replica.node, gpu__index__in=replica.gpu_ids)
    return list(Alert.objects.filter(wanted, resolved_at__isnull=True).select_related("gpu"))


def _kick() -> None:
    """Run a reconcile pass now rather than at the next beat tick."""
    from provisioning.tasks import reconcile_node

    transaction.on_commit(lambda: reconcile_node.apply_async(queue=settings.NODE_QUEUE))


@require_GET
@requires("deployment.view")
def index(request: HttpRequest) -> HttpResponse:
    see_runtimes = can(request.user, "runtime.view")
    installing = RuntimeJob.objects.filter(status__in=["queued", "running"]).first() if see_runtimes else None
    deployments = list(
        Deployment.objects.visible_to(request.user).select_related("model", "runtime").prefetch_related("replica_set")
    )
    tokens = tokens_by_model(request.user)
    for deployment in deployments:
        deployment.tokens_24h = tokens.get(deployment.name, 0)
    return render(
        request,
        "provisioning/list.html",
        {
            "deployments": deployments,
            "gateway_url": request.build_absolute_uri("/v1"),
            "runtimes": EngineRuntime.objects.all() if see_runtimes else None,
            "install_job": installing,
            "engine_ready_here": EngineRuntime.objects.filter(node=settings.NODE_NAME, status="ready").exists(),
            "see_install_log": can(request.user, "engine_log.view"),
            "nav": "deployments",
        },
    )


@require_POST
@requires("runtime.install")
def install_runtime(request: HttpRequest) -> HttpResponse:
    if RuntimeJob.objects.filter(status__in=["queued", "running"]).exists():
        messages.error(request, _("An engine is being installed already."))
    else:
        job = request_install(user=request.user)
        audit.record(request, "engine.install", job.runtime)
    return redirect("provisioning:list")


@requires("deployment.manage")
def deploy(request: HttpRequest) -> HttpResponse:
    """GET: the form prefilled for ?model=<id>. POST (admins): create the deployment."""
    runtime = EngineRuntime.objects.filter(node=settings.NODE_NAME, status="ready").first()
    if request.method == "POST":
        return _create(request)
    model = LocalModel.objects.filter(pk=request.GET.get("model") or 0).first()
    initial = recommended(model, runtime) if model else {}
    return render(
        request,
        "provisioning/deploy.html",
        {"form": DeployForm(initial=initial), "no_runtime": runtime is None, "nav": "deployments"},
    )


@require_GET
@requires("deployment.manage")
def deploy_memory(request: HttpRequest) -> HttpResponse:
    """The deploy form's memory panel for the form's current values (htmx, on every change)."""
    result, why = capacity.from_query(request.GET)
    return render(request, "provisioning/_memory.html", {"capacity": result, "why": why})


def _create(request: HttpRequest) -> HttpResponse:
    form = DeployForm(request.POST)
    if form.is_valid():
        deployment = Deployment.from_form(form.cleaned_data, request.user)
        try:
            scheduler.check(deployment)  # refuse at once what would not fit
        except PlacementRefused as exc:
            form.add_error(None, str(exc))
        else:
            try:
                with transaction.atomic():
                    deployment.save()
                    audit.record(request, "deployment.create", deployment, detail={"model": deployment.model.repo_id})
                    _kick()
            except IntegrityError:  # the same name submitted twice at once: one wins
                form.add_error("name", _("A deployment with this name exists already."))
            else:
                return redirect("provisioning:detail", name=deployment.name)
    return render(request, "provisioning/deploy.html", {"form": form, "nav": "deployments"}, status=400)


@require_GET
@requires("deployment.view")
def engine_chart(request: HttpRequest, name: str) -> HttpResponse:
    """One engine-metrics chart of a deployment (JSON for the page's charts)."""
    deployment = get_object_or_404(Deployment.objects.visible_to(request.user), name=name)
    try:
        data = engine_metrics.series(deployment, request.GET.get("range", "1h"), request.GET.get("metric", "requests"))
    except ValueError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse(data)


@require_GET
@requires("deployment.view")
def detail(request: HttpRequest, name: str) -> HttpResponse:
    deployment = get_object_or_404(Deployment.objects.visible_to(request.user).select_related("model", "runtime"),
                                   name=name)  # fmt: skip
    template = "provisioning/_replicas.html" if request.headers.get("HX-Request") else "provisioning/detail.html"
    replicas = list(deployment.replica_set.all())
    can_see_log = deployment.can_view_log(request.user)
    for replica in replicas:  # a starting engine's current step, from its log
        replica.step = launcher.last_step(replica.log_path) if can_see_log and replica.state == "starting" else ""
    return render(
        request,
        template,
        {
            "deployment": deployment,
            "replicas": replicas,
            "log": launcher.log_tail(replicas[0].log_path, 4000) if replicas and can_see_log else "",
            "can_see_log": can_see_log,
            "can_manage": deployment.can_manage(request.user),
            "scale_form": ScaleForm(initial={"replicas": deployment.replicas}),
            "gpu_alerts": gpu_alerts(replicas),
            "gateway_url": request.build_absolute_uri("/v1"),
            "departments": deployment.departments.visible_to(request.user).order_by("name").only("pk", "name")[:20],
            "engine_charts": [(key, chart[0]) for key, chart in engine_metrics.CHARTS.items()],
            "targets_form": TargetsForm(instance=deployment),
            "target_alerts": deployment.target_alerts.select_related("acknowledged_by")[:10],
            "ranges": RANGES,
            "nav": "deployments",
        },
    )


DEPLOYMENT_ACTIONS = {
    action: "deployment.manage" for action in ("stop", "start", "restart", "scale", "delete", "targets", "acknowledge")
}


@require_POST
@requires("deployment.manage", per_action=DEPLOYMENT_ACTIONS)
def act(request: HttpRequest, name: str, action: str) -> HttpResponse:
    deployment = get_object_or_404(Deployment, name=name)
    if action == "stop":
        Deployment.objects.filter(pk=deployment.pk).update(desired=Deployment.Desired.STOPPED)
    elif action in ("start", "restart"):
        deployment.run(retry_failed=action == "restart")
    elif action == "scale":
        form = ScaleForm(request.POST)
        if not form.is_valid():
            messages.error(request, " ".join(form.errors.get("replicas", [])))
            return redirect("provisioning:detail", name=name)
        Deployment.objects.filter(pk=deployment.pk).update(replicas=form.cleaned_data["replicas"])
    elif action == "targets":
        form = TargetsForm(request.POST, instance=deployment)
        if not form.is_valid():
            messages.error(request, " ".join(f"{form.fields[f].label}: {' '.join(e)}" for f, e in form.errors.items()))
            return redirect("provisioning:detail", name=name)
        form.save()
        audit.record(request, "deployment.targets", deployment, detail=form.cleaned_data)
        messages.success(request, _("Targets of %(name)s saved: they are checked at every scrape of its engines.")
                         % {"name": name})  # fmt: skip
        return redirect("provisioning:detail", name=name)
    elif action == "acknowledge":
        count = targets.acknowledge_open(deployment, request.user)
        audit.record(request, "deployment.acknowledge", deployment, detail={"alerts": count})
        messages.success(request, _("Acknowledged: they stay open until the deployment is within its targets."))
        return redirect("provisioning:detail", name=name)
    elif action == "delete":
        try:
            outcome = deployment.remove()
        except DeploymentBusy as exc:
            messages.error(request, str(exc))
            return redirect("provisioning:detail", name=name)
        audit.record(request, "deployment.delete", deployment, detail={"outcome": outcome})
        if outcome == ARCHIVED:
            text = _("Deployment %(name)s deleted. Past usage refers to it, so it is kept, archived, for the bills; "
                     "the name is free again.")  # fmt: skip
            messages.success(request, text % {"name": name})
        else:
            messages.success(request, _("Deployment %(name)s deleted.") % {"name": name})
        return redirect("provisioning:list")
    else:
        return render(request, "404.html", status=404)
    audit.record(
        request, f"deployment.{action}", deployment, detail=dict(request.POST.items()) if action == "scale" else {}
    )
    _kick()
    done = {
        "stop": _("Stopping %(name)s: its replicas are stopped within a few seconds."),
        "start": _("Starting %(name)s: it is ready when its replicas are (see below)."),
        "restart": _("Restarting %(name)s."),
        "scale": _("Scaling %(name)s to %(replicas)s replicas."),
    }[action]
    messages.success(request, done % {"name": name, "replicas": request.POST.get("replicas", "")})
    return redirect("provisioning:detail", name=name)
