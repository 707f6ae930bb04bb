"""Deployments pages: list with engine runtimes, the deploy form, a deployment's live page."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import IntegrityError, transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from appliance import audit
from appliance.roles import Role, require_role
from models_catalog.models import LocalModel
from provisioning import launcher
from provisioning.forms import DeployForm, ScaleForm, recommended
from provisioning.models import Deployment, EngineRuntime, Replica, RuntimeJob
from provisioning.placement import PlacementRefused, place
from provisioning.runtimes import request_install

admin_only = require_role(Role.APPLIANCE_ADMIN)


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


@login_required
@require_GET
def index(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "provisioning/list.html",
        {
            "deployments": Deployment.objects.select_related("model", "runtime").prefetch_related("replica_set"),
            "runtimes": EngineRuntime.objects.all(),
            "install_job": RuntimeJob.objects.filter(status__in=["queued", "running"]).first(),
            "nav": "deployments",
        },
    )


@require_POST
@admin_only
def install_runtime(request: HttpRequest) -> HttpResponse:
    if RuntimeJob.objects.filter(status__in=["queued", "running"]).exists():
        messages.error(request, _("An engine is being installed already."))
    else:
        job = request_install(user=request.user)
        audit.record(request, "engine.install", job.runtime)
    return redirect("provisioning:list")


@login_required
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


@admin_only
def _create(request: HttpRequest) -> HttpResponse:
    form = DeployForm(request.POST)
    if form.is_valid():
        deployment = Deployment.from_form(form.cleaned_data, request.user)
        try:
            place(deployment)  # refuse at once what would not fit
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


@login_required
@require_GET
def detail(request: HttpRequest, name: str) -> HttpResponse:
    deployment = get_object_or_404(Deployment.objects.select_related("model", "runtime"), name=name)
    template = "provisioning/_replicas.html" if request.headers.get("HX-Request") else "provisioning/detail.html"
    replicas = list(deployment.replica_set.all())
    return render(
        request,
        template,
        {
            "deployment": deployment,
            "replicas": replicas,
            "log": launcher.log_tail(replicas[0].log_path, 4000) if replicas else "",
            "scale_form": ScaleForm(initial={"replicas": deployment.replicas}),
            "gpu_alerts": gpu_alerts(replicas),
            "gateway_url": request.build_absolute_uri("/v1"),
            "departments": deployment.departments.order_by("name").only("pk", "name")[:20],
            "nav": "deployments",
        },
    )


@require_POST
@admin_only
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
    elif action == "delete":
        if deployment.replica_set.exclude(state__in=list(Replica.TERMINAL)).exists() or deployment.desired == "running":
            messages.error(request, _("Stop the deployment and wait for its replicas to stop before deleting it."))
            return redirect("provisioning:detail", name=name)
        audit.record(request, "deployment.delete", deployment)
        deployment.delete()
        return redirect("provisioning:list")
    else:
        return render(request, "404.html", status=404)
    audit.record(
        request, f"deployment.{action}", deployment, detail=dict(request.POST.items()) if action == "scale" else {}
    )
    _kick()
    return redirect("provisioning:detail", name=name)
