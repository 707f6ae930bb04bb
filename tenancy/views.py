"""Departments pages: list, quotas, members and API keys; usage reports, CSV exports and chargeback.
Scoped through ``visible_to(user)``: a department admin reaches only their own department (others
are 404, never 403 with details; report filters naming them are refused like unknown ids)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from itertools import islice
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import messages
from django.core.handlers.asgi import ASGIRequest
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from appliance import audit
from appliance.archiving import ARCHIVED
from appliance.roles import forbidden, requires
from appliance.worker import redis_client
from provisioning.models import Deployment
from tenancy import reports
from tenancy.costs import IDLE_DAYS, cost_csv, cost_view
from tenancy.forms import DepartmentForm, KeyForm, MemberForm, ModelPriceForm, MonthForm, RotateForm, UsageFilterForm
from tenancy.limiter import Limiter
from tenancy.models import ApiKey, Department, Membership, ModelPrice, price_detail

PAGE_SIZE = 50  # departments per page of the list, API keys per page of a department
PANEL_KEY_ROWS = 25  # keys in a department page's usage table; the full report has the rest


def _department(request: HttpRequest, department_id: int) -> Department:
    """A department the user may see and that is not deleted (archived ones are kept for the bills)."""
    return get_object_or_404(Department.objects.visible_to(request.user).active(), pk=department_id)


def _list_context(request: HttpRequest, form: DepartmentForm) -> dict[str, Any]:
    now = timezone.now()
    usable = (Q(api_keys__archived_at__isnull=True) & (Q(api_keys__revoked_at__isnull=True)
              | Q(api_keys__revoked_at__gt=now)) & (Q(api_keys__expires_at__isnull=True)
              | Q(api_keys__expires_at__gt=now)))  # fmt: skip
    departments = (
        Department.objects.visible_to(request.user)
        .active()
        .annotate(usable_keys=Count("api_keys", filter=usable))
        .order_by("name")
    )
    page = Paginator(departments, PAGE_SIZE).get_page(request.GET.get("page"))
    _add_consumption(list(page))
    return {"departments": page, "page": page, "form": form, "nav": "departments"}


def _add_consumption(departments: list[Department]) -> None:
    """``used_today``/``used_this_month`` on each, from the limiter's counters (None: Redis is away)."""
    try:
        used = Limiter(redis_client()).budgets_used([d.pk for d in departments])
    except redis.RedisError:
        used = {}
    for department in departments:
        department.used_today, department.used_this_month = used.get(department.pk, (None, None))


@require_GET
@requires("department.view")
def index(request: HttpRequest) -> HttpResponse:
    return render(request, "tenancy/list.html", _list_context(request, DepartmentForm()))


@require_POST
@requires("department.manage")
def create(request: HttpRequest) -> HttpResponse:
    form = DepartmentForm(request.POST)
    if not form.is_valid():
        return render(request, "tenancy/list.html", _list_context(request, form), status=400)
    department = form.save()
    audit.record(request, "department.create", department)
    messages.success(request, _("Department %(name)s created. Issue it a key below.") % {"name": department.name})
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
    _add_consumption([department])
    return {
        "department": department,
        "form": forms.get("form") or DepartmentForm(instance=department),
        "member_form": forms.get("member_form") or MemberForm(),
        "key_form": forms.get("key_form") or KeyForm(department=department),
        "rotate_form": RotateForm(),
        "members": department.memberships.select_related("user"),
        "keys": Paginator(
            ApiKey.objects.visible_to(request.user)
            .active()
            .filter(department=department)
            .prefetch_related("deployments"),
            PAGE_SIZE,
        ).get_page(request.GET.get("page")),
        "can_manage_keys": department.can_manage_keys(request.user),
        "can_manage": department.can_manage(request.user),
        "can_manage_members": department.can_manage_members(request.user),
        "usage": _usage_panel(request, department),
        "nav": "departments",
    }


@require_GET
@requires("department.view")
def detail(request: HttpRequest, department_id: int) -> HttpResponse:
    department = _department(request, department_id)
    return render(request, "tenancy/detail.html", _detail_context(request, department))


@require_POST
@requires("department.manage")
def update(request: HttpRequest, department_id: int) -> HttpResponse:
    department = _department(request, department_id)
    if not department.can_manage(request.user):
        return forbidden(request, "department.update")
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
@requires("department.manage")
def delete_department(request: HttpRequest, department_id: int) -> HttpResponse:
    """Delete the department, or archive it when past usage refers to it (``Department.remove``)."""
    department = _department(request, department_id)
    if not department.can_manage(request.user):
        return forbidden(request, "department.delete")
    keys_count = department.api_keys.active().count()
    outcome = department.remove()
    audit.record(request, "department.delete", department, detail={"keys": keys_count, "outcome": outcome})
    if outcome == ARCHIVED:
        text = _("Department %(name)s deleted. Past usage refers to it, so it is kept, archived, for the bills, "
                 "and its name stays taken.")  # fmt: skip
        messages.success(request, text % {"name": department.name})
    else:
        messages.success(request, _("Department %(name)s deleted.") % {"name": department.name})
    return redirect("tenancy:list")


@require_POST
@requires("member.manage")
def add_member(request: HttpRequest, department_id: int) -> HttpResponse:
    department = _department(request, department_id)
    if not department.can_manage_members(request.user):
        return forbidden(request, "department.member_set")
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
    messages.success(
        request,
        _("%(user)s is now %(role)s of %(department)s.")
        % {"user": membership.user.username, "role": membership.get_role_display(), "department": department.name},
    )
    return redirect("tenancy:detail", department_id=department.pk)


@require_POST
@requires("member.manage")
def remove_member(request: HttpRequest, department_id: int, user_id: int) -> HttpResponse:
    department = _department(request, department_id)
    if not department.can_manage_members(request.user):
        return forbidden(request, "department.member_remove")
    membership = get_object_or_404(department.memberships.select_related("user"), user_id=user_id)
    audit.record(request, "department.member_remove", department, detail={"user": membership.user.username})
    membership.delete()
    messages.success(request, _("%(user)s is no longer a member of %(department)s.") % {
        "user": membership.user.username, "department": department.name})  # fmt: skip
    return redirect("tenancy:detail", department_id=department.pk)


@require_POST
@requires("api_key.manage")
@never_cache
def issue_key(request: HttpRequest, department_id: int) -> HttpResponse:
    department = _department(request, department_id)
    if not department.can_manage_keys(request.user):
        return forbidden(request, "api_key.issue")
    form = KeyForm(request.POST, department=department)
    if not form.is_valid():
        return render(request, "tenancy/detail.html", _detail_context(request, department, key_form=form), status=400)
    fields = {k: form.cleaned_data[k] for k in ("rpm", "tpm", "max_concurrency", "max_tokens_per_request",
                                                "all_deployments")}  # fmt: skip
    key, raw = ApiKey.issue(department, form.cleaned_data["name"], request.user, expires_at=form.expires_at(),
                            deployments=form.cleaned_data["deployments"], **fields)  # fmt: skip
    detail = {"department": department.name, "all_deployments": key.all_deployments,
              "deployments": sorted(d.pk for d in form.cleaned_data["deployments"])}  # fmt: skip
    audit.record(request, "api_key.issue", key, detail=detail)
    return _to_reveal(request, department, key, raw)


REVEAL = "tenancy:reveal:{}"


def _to_reveal(request: HttpRequest, department: Department, key: ApiKey, raw: str) -> HttpResponse:
    """Post/redirect/get: the secret waits in the session for the one page that shows it, so a
    reload of that page (or going back to it) issues nothing and shows the secret no more."""
    request.session[REVEAL.format(key.pk)] = raw
    return redirect("tenancy:reveal", department_id=department.pk, key_id=key.pk)


@require_GET
@requires("api_key.manage")
@never_cache
def reveal(request: HttpRequest, department_id: int, key_id: int) -> HttpResponse:
    department = _department(request, department_id)
    key = get_object_or_404(ApiKey.objects.visible_to(request.user).active(), pk=key_id, department=department)
    raw = request.session.pop(REVEAL.format(key.pk), None)
    context = {"department": department, "key": key, "secret": raw, "nav": "departments",
               "gateway_url": request.build_absolute_uri("/v1"),
               "model": Deployment.objects.filter(pk__in=key.allowed_deployment_ids()).values_list("name", flat=True)
               .order_by("name").first() or "<deployment>"}  # fmt: skip
    return render(request, "tenancy/reveal.html", context)


@require_POST
@requires("api_key.manage", per_action={"revoke": "api_key.manage", "rotate": "api_key.manage",
                                         "delete": "api_key.manage"})  # fmt: skip
def key_action(request: HttpRequest, department_id: int, key_id: int, action: str) -> HttpResponse:
    department = _department(request, department_id)
    key = get_object_or_404(ApiKey.objects.visible_to(request.user).active(), pk=key_id, department=department)
    if not key.can_manage(request.user):
        return forbidden(request, f"api_key.{action}")
    if action == "delete":
        outcome = key.remove()
        audit.record(request, "api_key.delete", key, detail={"outcome": outcome})
        if outcome == ARCHIVED:
            messages.success(request, _("Key %(name)s deleted. Past usage refers to it, so it is kept, archived, "
                                        "for the bills.") % {"name": key.name})  # fmt: skip
        else:
            messages.success(request, _("Key %(name)s deleted.") % {"name": key.name})
        return redirect("tenancy:detail", department_id=department.pk)
    if action == "revoke":
        key.revoke()
        audit.record(request, "api_key.revoke", key)
        messages.success(request, _("Key %(name)s revoked: it no longer works.") % {"name": key.name})
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
        return _to_reveal(request, department, new, raw)
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


@require_GET
@requires("usage.view")
def usage(request: HttpRequest) -> HttpResponse:
    return _usage_page(request, UsageFilterForm(request.GET, user=request.user))


@require_GET
@requires("usage.view")
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
        "currency": settings.CURRENCY,
        "form": month_form,
        "price_form": price_form or ModelPriceForm(),
        "prices": ModelPrice.visible_to(request.user),
        "can_set_price": ModelPrice.can_set(request.user),
        "nav": "departments",
    }
    if month_form.is_valid():
        report = reports.chargeback(request.user, month_form.cleaned_data["month"])
        # Deleted (archived) deployments too: their names are still billed, and the page reads the same after.
        names = set(Deployment.all_objects.visible_to(request.user).values_list("name", flat=True))
        names.update(line.model for charge in report.departments for line in charge.lines)
        context.update(report=report, month=f"{report.month:%Y-%m}", model_names=sorted(names))
    else:
        status = max(status, bad_month_status)
    return render(request, "tenancy/chargeback.html", context, status=status)


@require_GET
@requires("usage.view")
def chargeback(request: HttpRequest) -> HttpResponse:
    return _chargeback_page(request, MonthForm(request.GET))


@require_GET
@requires("usage.view")
def chargeback_csv(request: HttpRequest) -> HttpResponse:
    form = MonthForm(request.GET)
    if not form.is_valid():
        return _chargeback_page(request, form, bad_month_status=400)
    report = reports.chargeback(request.user, form.cleaned_data["month"])
    return _csv_response(request, reports.chargeback_csv(report), f"chargeback-{report.month:%Y-%m}.csv")


@require_GET
@requires("cost.view")
def costs(request: HttpRequest) -> HttpResponse:
    """The month's cost view: what each deployment's GPU time bought (tenancy.costs)."""
    form = MonthForm(request.GET)
    context: dict[str, Any] = {"form": form, "currency": settings.CURRENCY, "nav": "departments"}
    if not form.is_valid():
        return render(request, "tenancy/costs.html", context, status=400)
    view = cost_view(request.user, form.cleaned_data["month"])
    context.update(view=view, month=f"{view.month:%Y-%m}", idle_days=IDLE_DAYS)
    return render(request, "tenancy/costs.html", context)


@require_GET
@requires("cost.view")
def costs_csv(request: HttpRequest) -> HttpResponse:
    form = MonthForm(request.GET)
    if not form.is_valid():
        return costs(request)
    view = cost_view(request.user, form.cleaned_data["month"])
    return _csv_response(request, cost_csv(view), f"costs-{view.month:%Y-%m}.csv")


@require_POST
@requires("price.set")
def delete_price(request: HttpRequest, price_id: int) -> HttpResponse:
    """Remove one served model's prices: its tokens and GPU-hours cost nothing in chargeback from then on."""
    price = get_object_or_404(ModelPrice, pk=price_id)
    with transaction.atomic():
        audit.record(request, "model_price.delete", price, detail=price_detail(price))
        price.delete()
    messages.success(
        request, _("Prices of %(model)s removed: it costs nothing in chargeback now.") % {"model": price.model}
    )
    month = request.POST.get("month", "")
    url = reverse("tenancy:chargeback")
    return redirect(f"{url}?month={month}" if re.fullmatch(r"\d{4}-\d{2}", month) else url)


@require_POST
@requires("price.set")
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
