"""Pages of the Models section: list, add (download or import), model page, job progress, hub
endpoints. Every change goes through the model's request_* methods and is audited."""

from __future__ import annotations

from urllib.parse import urlencode

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from appliance import audit
from appliance.models import AuditEvent
from appliance.roles import requires
from models_catalog.forms import DownloadForm, EndpointForm, EstimateForm, ImportForm
from models_catalog.importer import ImportRefused
from models_catalog.layout import UnsafePath
from models_catalog.memory import estimate
from models_catalog.models import HubEndpoint, JobConflict, LocalModel, ModelJob


def _list_context(request: HttpRequest) -> dict:
    query = request.GET.get("q", "").strip()[:200]
    models = LocalModel.objects.all()
    if query:
        models = models.filter(Q(repo_id__icontains=query))
    page = Paginator(models, 50).get_page(request.GET.get("page"))
    jobs = {
        job.model_id: job
        for job in ModelJob.objects.filter(model__in=list(page), status__in=["queued", "running"]).order_by(
            "created_at"
        )
    }
    rows = [(model, jobs.get(model.pk)) for model in page]
    page_query = urlencode({"q": query}) if query else ""
    return {"rows": rows, "page": page, "query": query, "page_query": page_query, "any_active": bool(jobs),
            "nav": "models"}  # fmt: skip


@require_GET
@requires("model.view")
def index(request: HttpRequest) -> HttpResponse:
    template = "models_catalog/_table.html" if request.headers.get("HX-Request") else "models_catalog/list.html"
    return render(request, template, _list_context(request))


@require_GET
@requires("model.manage")
def add(request: HttpRequest) -> HttpResponse:
    return render(
        request, "models_catalog/add.html", {"download": DownloadForm(), "import_form": ImportForm(), "nav": "models"}
    )


def _add_again(request: HttpRequest, download: DownloadForm, import_form: ImportForm) -> HttpResponse:
    return render(
        request,
        "models_catalog/add.html",
        {"download": download, "import_form": import_form, "nav": "models"},
        status=400,
    )


@require_POST
@requires("model.manage")
def download(request: HttpRequest) -> HttpResponse:
    form = DownloadForm(request.POST)
    if not form.is_valid():
        return _add_again(request, form, ImportForm())
    data = form.cleaned_data
    try:
        job = LocalModel.request_download(
            data["repo_id"], data["revision"], data["endpoint"], data["allow_patterns"], data["ignore_patterns"],
            user=request.user,
        )  # fmt: skip
    except JobConflict as exc:
        form.add_error("repo_id", str(exc))
        return _add_again(request, form, ImportForm())
    audit.record(request, "model.download", job.model, detail={"revision": data["revision"]})
    return redirect("models_catalog:detail", model_id=job.model_id)


@require_POST
@requires("model.manage")
def import_directory(request: HttpRequest) -> HttpResponse:
    form = ImportForm(request.POST)
    if not form.is_valid():
        return _add_again(request, DownloadForm(), form)
    try:
        data = form.cleaned_data
        job = LocalModel.request_import(data["directory"], data["repo_id"], request.user, replace=data["replace"])
    except (JobConflict, ImportRefused, UnsafePath) as exc:
        form.add_error(None, str(exc))
        return _add_again(request, DownloadForm(), form)
    audit.record(request, "model.import", job.model, detail={"directory": form.cleaned_data["directory"]})
    return redirect("models_catalog:detail", model_id=job.model_id)


@require_GET
@requires("model.view")
def detail(request: HttpRequest, model_id: int) -> HttpResponse:
    model = get_object_or_404(LocalModel, pk=model_id)
    facts = model.facts()
    context_length = facts.get("context_length") or 4096
    estimate_form = EstimateForm(request.GET or {"context_length": min(context_length, 32768), "concurrency": 16})
    return render(
        request,
        "models_catalog/detail.html",
        {
            "model": model,
            "facts": facts,
            "estimate_form": estimate_form,
            "estimate": _estimate(facts, estimate_form),
            "jobs": model.jobs.all()[:20],
            "shown_job": model.shown_job(),
            "events": AuditEvent.objects.filter(target_type="models_catalog.localmodel", target_id=str(model.pk))[:20],
            "files": model.files.all(),
            "copies": model.copies.all(),
            "nav": "models",
        },
    )


def _estimate(facts: dict, form: EstimateForm) -> dict | str | None:
    if not form.is_valid():
        return None
    try:
        return estimate(facts, form.cleaned_data["context_length"], form.cleaned_data["concurrency"])
    except ValueError as exc:
        return str(exc)


@require_GET
@requires("model.view")
def estimate_panel(request: HttpRequest, model_id: int) -> HttpResponse:
    model = get_object_or_404(LocalModel, pk=model_id)
    form = EstimateForm(request.GET)
    return render(
        request,
        "models_catalog/_estimate.html",
        {"model": model, "estimate_form": form, "estimate": _estimate(model.facts(), form)},
    )


@require_GET
@requires("model.view")
def job_progress(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_object_or_404(ModelJob, pk=job_id)
    response = render(request, "models_catalog/_progress.html", {"job": job})
    if not job.is_active:
        # Tell htmx to reload the model page once, so its status and files show the outcome.
        response["HX-Refresh"] = "true"
    return response


ACTIONS = {
    "update": ModelJob.Kind.UPDATE,
    "verify": ModelJob.Kind.VERIFY,
    "resume": ModelJob.Kind.DOWNLOAD,
}


# The rule of each action of the model page (``appliance.roles``); an action not listed is 404.
ACTION_RULES = {
    **{action: "model.manage" for action in ("update", "verify", "resume", "check", "delete")},
    "allow-remote-code": "model.allow_remote_code",
}


@require_POST
@requires("model.manage", per_action=ACTION_RULES)
def act(request: HttpRequest, model_id: int, action: str) -> HttpResponse:
    model = get_object_or_404(LocalModel, pk=model_id)
    try:
        if action == "delete":
            model.request_delete(request.user)
        elif action == "resume":
            model.resume(request.user)
        elif action == "check":
            from models_catalog.tasks import check_model

            check_model.delay(model.pk)
            messages.info(request, _("Asking the source for the latest commit…"))
        elif action == "allow-remote-code":
            allowed = request.POST.get("allow") == "1"
            LocalModel.objects.filter(pk=model.pk).update(allow_remote_code=allowed)
            audit.record(request, "model.allow_remote_code", model, detail={"allowed": allowed})
            return redirect("models_catalog:detail", model_id=model.pk)
        elif action in ACTIONS:
            model.start_job(ACTIONS[action], request.user)
        else:
            return render(request, "404.html", status=404)
    except (JobConflict, ImportRefused, UnsafePath) as exc:
        messages.error(request, str(exc))
        return redirect("models_catalog:detail", model_id=model.pk)
    audit.record(request, f"model.{action}", model)
    if action == "delete":
        messages.success(request, _("Deleting %(repo)s.") % {"repo": model.repo_id})
        return redirect("models_catalog:list")
    return redirect("models_catalog:detail", model_id=model.pk)


@require_POST
@requires("model.manage")
def cancel_job(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_object_or_404(ModelJob, pk=job_id)
    if job.cancel():
        audit.record(request, "model.job_cancel", job.model, detail={"job": job.pk, "kind": job.kind})
    if job.model_id:
        return redirect("models_catalog:detail", model_id=job.model_id)
    return redirect("models_catalog:list")


@require_GET
@requires("model.view")
def endpoints(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "models_catalog/endpoints.html",
        {"endpoints": HubEndpoint.objects.all(), "form": EndpointForm(), "nav": "models"},
    )


@require_POST
@requires("hub_endpoint.manage")
def endpoint_save(request: HttpRequest, endpoint_id: int | None = None) -> HttpResponse:
    instance = get_object_or_404(HubEndpoint, pk=endpoint_id) if endpoint_id else None
    form = EndpointForm(request.POST, instance=instance)
    if not form.is_valid():
        return render(
            request,
            "models_catalog/endpoints.html",
            {"endpoints": HubEndpoint.objects.all(), "form": form, "nav": "models"},
            status=400,
        )
    endpoint = form.save()
    audit.record(
        request,
        "hub_endpoint.update" if instance else "hub_endpoint.create",
        endpoint,
        detail={"url": endpoint.url, "token_changed": bool(form.cleaned_data.get("token"))},
    )
    return redirect("models_catalog:endpoints")


@require_POST
@requires("hub_endpoint.manage")
def endpoint_delete(request: HttpRequest, endpoint_id: int) -> HttpResponse:
    endpoint = get_object_or_404(HubEndpoint, pk=endpoint_id)
    if endpoint.models.exists():
        messages.error(request, _("Models were downloaded from this source; delete them first."))
        return redirect("models_catalog:endpoints")
    audit.record(request, "hub_endpoint.delete", endpoint)
    endpoint.delete()
    return redirect("models_catalog:endpoints")
