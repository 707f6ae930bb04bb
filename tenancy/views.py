"""Departments pages: list, quotas, members and API keys. Scoped through ``visible_to(user)``: a
department admin reaches only their own department (others are 404, never 403 with details)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from appliance import audit
from appliance.roles import Role, forbidden, require_role, role_of
from tenancy.forms import DepartmentForm, KeyForm, MemberForm, RotateForm
from tenancy.models import ApiKey, Department, Membership

admin_only = require_role(Role.APPLIANCE_ADMIN)


def can_manage_keys(user: Any, department: Department) -> bool:
    if role_of(user) == Role.APPLIANCE_ADMIN:
        return True
    return Membership.objects.filter(user=user, department=department, role=Membership.Role.ADMIN).exists()


def _department(request: HttpRequest, department_id: int) -> Department:
    return get_object_or_404(Department.objects.visible_to(request.user), pk=department_id)


@login_required
@require_GET
def index(request: HttpRequest) -> HttpResponse:
    departments = Department.objects.visible_to(request.user)
    return render(
        request,
        "tenancy/list.html",
        {"departments": departments, "form": DepartmentForm(), "nav": "departments"},
    )


@require_POST
@admin_only
def create(request: HttpRequest) -> HttpResponse:
    form = DepartmentForm(request.POST)
    if not form.is_valid():
        return render(request, "tenancy/list.html", {"departments": Department.objects.all(), "form": form,
                                                     "nav": "departments"}, status=400)  # fmt: skip
    department = form.save()
    audit.record(request, "department.create", department)
    return redirect("tenancy:detail", department_id=department.pk)


def _detail_context(request: HttpRequest, department: Department, **forms: Any) -> dict[str, Any]:
    return {
        "department": department,
        "form": forms.get("form") or DepartmentForm(instance=department),
        "member_form": forms.get("member_form") or MemberForm(),
        "key_form": forms.get("key_form") or KeyForm(),
        "rotate_form": RotateForm(),
        "members": department.memberships.select_related("user"),
        "keys": ApiKey.objects.visible_to(request.user).filter(department=department),
        "can_manage_keys": can_manage_keys(request.user, department),
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
