"""Departments pages: list, quotas, members and API keys; usage reports, CSV exports and chargeback.
Scoped through ``visible_to(user)``: a department admin reaches only their own department (others
are 404, never 403 with details; report filters naming them are refused like unknown ids)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from itertools import islice
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.handlers.asgi import ASGIRequest
from django.core.paginator import Paginator
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from appliance import audit
from appliance.roles import Role, forbidden, login_redirect, require_role, role_of
from provisioning.models import Deployment
from tenancy import reports
from tenancy.forms import DepartmentForm, KeyForm, MemberForm, ModelPriceForm, MonthForm, RotateForm, UsageFilterForm
from tenancy.models import ApiKey, Department, Membership, ModelPrice

admin_only = require_role(Role.APPLIANCE_ADMIN)
PAGE_SIZE = 50  # departments per page of the list, API keys per page of a department
PANEL_KEY_ROWS = 25  # keys in a department page's usage table; the full report has the rest


def can_manage_keys(user: Any, department: Department) -> bool:
    if role_of(user) == Role.APPLIANCE_ADMIN:
        return True
    return Membership.objects.filter(user=user, department=department, role=Membership.Role.ADMIN).exists()


def _department(request: HttpRequest, department_id: int) -> Department:
    return get_object_or_404(Department.objects.visible_to(request.user), pk=department_id)


def _list_context(request: HttpRequest, form: DepartmentForm) -> dict[str, Any]:
    # The keys are prefetched (ids only) for the list's key count: one query, not one per department.
    departments = Department.objects.visible_to(request.user).prefetch_related(
        Prefetch("api_keys", queryset=ApiKey.objects.only("pk", "department_id").order_by())
    )
    page = Paginator(departments, PAGE_SIZE).get_page(request.GET.get("page"))
    return {"departments": page, "page": page, "form": form, "nav": "departments"}


@login_required
@require_GET
def index(request: HttpRequest) -> HttpResponse:
    return render(request, "tenancy/list.html", _list_context(request, DepartmentForm()))


@require_POST
@admin_only
def create(request: HttpRequest) -> HttpResponse:
    form = DepartmentForm(request.POST)
    if not form.is_valid():
        return render(request, "tenancy/list.html", _list_context(request, form), status=400)
    department = form.save()
    audit.record(request, "department.create", department)
    return redirect("tenancy:detail", department_id=department.pk)


def _usage_panel(request: HttpRequest, department: Department) -> dict[str, Any]:
    span = reports.Range.last_days(30)
    rows = reports.scoped_rollups(request.user, span, [department.pk])
    by_model = reports.report(rows, "model", span, limit=None)
    return {
        "span": span,
        "totals": by_model.totals,
        "chart": by_model.chart,
        "by_key": reports.breakdown(rows, "key", limit=PANEL_KEY_ROWS),
        "by_model": by_model.breakdown,
    }


def _detail_context(request: HttpRequest, department: Department, **forms: Any) -> dict[str, Any]:
    return {
        "department": department,
        "form": forms.get("form") or DepartmentForm(instance=department),
        "member_form": forms.get("member_form") or MemberForm(),
        "key_form": forms.get("key_form") or KeyForm(),
        "rotate_form": RotateForm(),
        "members": department.memberships.select_related("user"),
        "keys": Paginator(ApiKey.objects.visible_to(request.user).filter(department=department), PAGE_SIZE).get_page(
            request.GET.get("page")
        ),
        "can_manage_keys": can_manage_keys(request.user, department),
        "usage": _usage_panel(request, department),
        "nav": "departments",
    }


@login_required
@require_GET
def detail(request: HttpRequest, department_id: int) -> HttpResponse:
    department = _department(request, department_id)
    return render(request, "tenancy/detail.html", _detail_context(request, department))


@require_POST
@admin_only
def update(request: HttpRequest, department_id: int) -> HttpResponse:
    department = get_object_or_404(Department, pk=department_id)
    form = DepartmentForm(request.POST, instance=department)
    if not form.is_valid():
        department.refresh_from_db()
        return render(request, "tenancy/detail.html", _detail_context(request, department, form=form), status=400)
    form.save()
    audit.record(request, "department.update", department, detail={k: str(v) for k, v in form.cleaned_data.items()
                                                                   if k != "deployments"})  # fmt: skip
    messages.success(request, _("Quotas saved."))
    return redirect("tenancy:detail", department_id=department.pk)


@require_POST
@admin_only
def add_member(request: HttpRequest, department_id: int) -> HttpResponse:
    department = get_object_or_404(Department, pk=department_id)
    form = MemberForm(request.POST)
    if not form.is_valid():
        return render(
            request, "tenancy/detail.html", _detail_context(request, department, member_form=form), status=400
        )
    membership, _created = Membership.objects.update_or_create(
        user=form.cleaned_data["username"], department=department, defaults={"role": form.cleaned_data["role"]}
    )
    audit.record(request, "department.member_set", department, detail={"user": membership.user.username,
                                                                       "role": membership.role})  # fmt: skip
    return redirect("tenancy:detail", department_id=department.pk)


@require_POST
@never_cache
def issue_key(request: HttpRequest, department_id: int) -> HttpResponse:
    if not request.user.is_authenticated:  # the session expired on the department page
        return login_redirect(request)
    department = _department(request, department_id)
    if not can_manage_keys(request.user, department):
        return forbidden(request, "api_key.issue")
    form = KeyForm(request.POST)
    if not form.is_valid():
        return render(request, "tenancy/detail.html", _detail_context(request, department, key_form=form), status=400)
    fields = {k: form.cleaned_data[k] for k in ("rpm", "tpm", "max_concurrency", "max_tokens_per_request")}
    key, raw = ApiKey.issue(department, form.cleaned_data["name"], request.user, expires_at=form.expires_at(), **fields)
    audit.record(request, "api_key.issue", key, detail={"department": department.name})
    return _reveal(request, department, raw)


@never_cache
def _reveal(request: HttpRequest, department: Department, raw: str) -> HttpResponse:
    response = render(
        request,
        "tenancy/reveal.html",
        {"department": department, "secret": raw, "nav": "departments"},
    )
    return response


@require_POST
def key_action(request: HttpRequest, department_id: int, key_id: int, action: str) -> HttpResponse:
    if not request.user.is_authenticated:
        return login_redirect(request)
    department = _department(request, department_id)
    key = get_object_or_404(ApiKey.objects.visible_to(request.user), pk=key_id, department=department)
    if not can_manage_keys(request.user, department):
        return forbidden(request, f"api_key.{action}")
    if action == "revoke":
        key.revoke()
        audit.record(request, "api_key.revoke", key)
        return redirect("tenancy:detail", department_id=department.pk)
    if action == "rotate":
        form = RotateForm(request.POST)
        if not form.is_valid() or not key.is_usable:
            messages.error(request, _("This key cannot be rotated."))
            return redirect("tenancy:detail", department_id=department.pk)
        new, raw = key.rotate(timedelta(minutes=form.cleaned_data["grace_minutes"]), request.user)
        audit.record(
            request,
            "api_key.rotate",
            key,
            detail={"new_key": new.pk, "grace_minutes": form.cleaned_data["grace_minutes"]},
        )
        return _reveal(request, department, raw)
    return render(request, "404.html", status=404)


# Usage reports and chargeback


def _streamed(request: HttpRequest, lines: Iterator[str], per_chunk: int = 500) -> Iterator[str] | AsyncIterator[str]:
    """CSV lines sent a chunk at a time. Under ASGI Django reads a sync iterator whole before sending
    any of it, so there the chunks are pulled, one by one, from the thread that runs the queries."""

    def chunks() -> Iterator[str]:
        while chunk := "".join(islice(lines, per_chunk)):
            yield chunk

    if not isinstance(request, ASGIRequest):
        return chunks()
    source = chunks()
    take = sync_to_async(lambda: next(source, ""), thread_sensitive=True)

    async def pulled() -> AsyncIterator[str]:
        while chunk := await take():
            yield chunk

    return pulled()


def _csv_response(request: HttpRequest, lines: Iterator[str], filename: str) -> StreamingHttpResponse:
    response = StreamingHttpResponse(_streamed(request, lines), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _usage_page(request: HttpRequest, form: UsageFilterForm, bad_status: int = 200) -> HttpResponse:
    """The page; with filter errors it shows them next to their fields, and no data."""
    context: dict[str, Any] = {"form": form, "nav": "departments"}
    if not form.is_valid():
        return render(request, "tenancy/usage.html", context, status=bad_status)
    span, group = form.range(), form.cleaned_data["group"]
    rows = reports.scoped_rollups(request.user, span, form.department_ids())
    summary = reports.report(rows, group, span, limit=reports.BREAKDOWN_ROWS)
    context.update(
        span=span,
        group=group,
        totals=summary.totals,
        breakdown=summary.breakdown,
        chart=summary.chart,
        query=form.data.urlencode(),
    )
    return render(request, "tenancy/usage.html", context)


@login_required
@require_GET
def usage(request: HttpRequest) -> HttpResponse:
    return _usage_page(request, UsageFilterForm(request.GET, user=request.user))


@login_required
@require_GET
def usage_csv(request: HttpRequest) -> HttpResponse:
    """The selection of the usage page, one line per roll-up row; bad filters get the page with its errors."""
    form = UsageFilterForm(request.GET, user=request.user)
    if not form.is_valid():
        return _usage_page(request, form, bad_status=400)
    span = form.range()
    rows = reports.scoped_rollups(request.user, span, form.department_ids())
    return _csv_response(
        request, reports.usage_csv(rows, span), f"usage-{span.first:%Y-%m-%d}_{span.last:%Y-%m-%d}.csv"
    )


def _chargeback_page(
    request: HttpRequest,
    month_form: MonthForm,
    price_form: ModelPriceForm | None = None,
    status: int = 200,
    bad_month_status: int = 200,
) -> HttpResponse:
    context: dict[str, Any] = {
        "form": month_form,
        "price_form": price_form or ModelPriceForm(),
        "prices": ModelPrice.objects.all(),
        "nav": "departments",
    }
    if month_form.is_valid():
        report = reports.chargeback(request.user, month_form.cleaned_data["month"])
        names = set(Deployment.objects.values_list("name", flat=True))
        names.update(line.model for charge in report.departments for line in charge.lines)
        context.update(report=report, month=f"{report.month:%Y-%m}", model_names=sorted(names))
    else:
        status = max(status, bad_month_status)
    return render(request, "tenancy/chargeback.html", context, status=status)


@login_required
@require_GET
def chargeback(request: HttpRequest) -> HttpResponse:
    return _chargeback_page(request, MonthForm(request.GET))


@login_required
@require_GET
def chargeback_csv(request: HttpRequest) -> HttpResponse:
    form = MonthForm(request.GET)
    if not form.is_valid():
        return _chargeback_page(request, form, bad_month_status=400)
    report = reports.chargeback(request.user, form.cleaned_data["month"])
    return _csv_response(request, reports.chargeback_csv(report), f"chargeback-{report.month:%Y-%m}.csv")


@require_POST
@admin_only
def set_price(request: HttpRequest) -> HttpResponse:
    """Create or change one served model's prices (appliance admins; every change audited)."""
    month_form = MonthForm(request.POST)
    form = ModelPriceForm(request.POST)
    if not form.is_valid():
        return _chargeback_page(request, month_form, form, status=400)
    fields = ("prompt_per_million", "completion_per_million", "gpu_hour")
    data = form.cleaned_data
    price, created = ModelPrice.objects.get_or_create(model=data["model"])
    before = None if created else {name: str(getattr(price, name)) for name in fields}
    for name in fields:
        setattr(price, name, data[name])
    price.save()
    price.refresh_from_db()
    detail = {"before": before} | {name: str(getattr(price, name)) for name in fields}
    audit.record(request, "model_price.set", price, detail=detail)
    messages.success(request, _("Prices of %(model)s saved.") % {"model": price.model})
    url = reverse("tenancy:chargeback")
    return redirect(f"{url}?month={month_form.cleaned_data['month']:%Y-%m}" if month_form.is_valid() else url)
