"""Departments, their members and API keys in the management API (``/api/v1/departments``).

Scoped like the pages: every lookup goes through ``visible_to(user)``, so a department admin gets 404
for anything of another department. Changing a department (create, quotas, members, delete) needs an
appliance admin; keys need an appliance admin or an admin of that department. Refusals are audited.
Input is checked by the pages' forms (``tenancy.forms``), so the API and the UI refuse the same
things. A key's secret is in the issue and rotate responses only: never listed, never audited.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from ninja import Field, Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status
from pydantic import StrictInt

from appliance import audit
from appliance.api import admin_required
from tenancy import keys
from tenancy.forms import DepartmentForm, KeyApiForm, MemberForm
from tenancy.models import ApiKey, Department, Membership
from tenancy.views import can_manage_keys

router = Router(tags=["departments"])

QUOTA_FIELDS = ("rpm", "tpm", "tokens_per_day", "tokens_per_month", "max_concurrency", "max_tokens_per_request")
KEY_LIMIT_FIELDS = ("rpm", "tpm", "max_concurrency", "max_tokens_per_request")
MAX_GRACE_SECONDS = 30 * 86400
Quota = StrictInt | None  # null: unlimited; booleans and strings are refused rather than coerced


class DepartmentOut(Schema):
    id: int
    name: str
    contact: str
    priority: str
    deployment_ids: list[int]
    rpm: int | None
    tpm: int | None
    tokens_per_day: int | None
    tokens_per_month: int | None
    max_concurrency: int | None
    max_tokens_per_request: int | None
    created_at: datetime

    @staticmethod
    def resolve_deployment_ids(obj: Department) -> list[int]:
        return sorted(d.pk for d in obj.deployments.all())


class DepartmentIn(Schema):
    name: str
    contact: str = ""
    priority: str = Department.Priority.NORMAL
    deployment_ids: list[int] = Field(default_factory=list, max_length=1000)
    rpm: Quota = None
    tpm: Quota = None
    tokens_per_day: Quota = None
    tokens_per_month: Quota = None
    max_concurrency: Quota = None
    max_tokens_per_request: Quota = None


class DepartmentPatch(Schema):
    """Only the fields sent change; ``null`` sets a quota to unlimited."""

    name: str | None = None
    contact: str | None = None
    priority: str | None = None
    deployment_ids: list[int] | None = Field(None, max_length=1000)
    rpm: Quota = None
    tpm: Quota = None
    tokens_per_day: Quota = None
    tokens_per_month: Quota = None
    max_concurrency: Quota = None
    max_tokens_per_request: Quota = None


class MemberOut(Schema):
    username: str = Field(alias="user.username")
    role: str


class MemberIn(Schema):
    username: str
    role: str = Membership.Role.VIEWER


class KeyOut(Schema):
    id: int
    department_id: int
    name: str
    hint: str = Field(..., description="The key's first characters, to tell keys apart; never the key.")
    state: str = Field(..., description="active, grace (rotated, still working), revoked or expired")
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    grace_until: datetime | None
    replaced_by_id: int | None
    last_used_at: datetime | None
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    max_tokens_per_request: int | None
    deployment_ids: list[int] = Field(..., description="Empty: every deployment of the department.")

    @staticmethod
    def resolve_hint(obj: ApiKey) -> str:
        return f"{keys.PREFIX}{obj.key_id[:4]}…"

    @staticmethod
    def resolve_state(obj: ApiKey) -> str:
        if obj.is_usable:
            return "grace" if obj.grace_until else "active"
        return "revoked" if obj.revoked_at is not None and obj.revoked_at <= timezone.now() else "expired"

    @staticmethod
    def resolve_created_by(obj: ApiKey) -> str | None:
        return obj.created_by.get_username() if obj.created_by else None

    @staticmethod
    def resolve_deployment_ids(obj: ApiKey) -> list[int]:
        return sorted(d.pk for d in obj.deployments.all())


class KeyIssuedOut(KeyOut):
    secret: str = Field(..., description="The key itself: shown in this response only, stored nowhere.")


class KeyIn(Schema):
    name: str
    expires_at: datetime | None = None
    rpm: Quota = None
    tpm: Quota = None
    max_concurrency: Quota = None
    max_tokens_per_request: Quota = None
    deployment_ids: list[int] = Field(
        default_factory=list, max_length=1000, description="Only deployments of the department; empty: all of them."
    )


class RotateIn(Schema):
    grace_seconds: int = Field(3600, ge=0, le=MAX_GRACE_SECONDS, description="How long the old key keeps working.")


# --- scoping and refusals -------------------------------------------------------------------------


def _department(request: HttpRequest, department_id: int) -> Department:
    """The department if the caller may see it; 404 otherwise (whether it exists or not)."""
    return get_object_or_404(Department.objects.visible_to(request.user), pk=department_id)


def _key(request: HttpRequest, department: Department, key_id: int) -> ApiKey:
    keys_seen = ApiKey.objects.visible_to(request.user).select_related("created_by").prefetch_related("deployments")
    return get_object_or_404(keys_seen, pk=key_id, department=department)


def _keys_admin_required(request: HttpRequest, department: Department, action: str) -> None:
    if not can_manage_keys(request.user, department):
        audit.record(request, action, department, outcome="denied", detail={"path": request.path, "via": "api"})
        raise HttpError(403, "Managing this department's keys needs its department admin or an appliance admin.")


def _invalid(form: forms.BaseForm, status: int = 422) -> HttpError:
    """The form's errors as one message, fields named as the API names them."""
    api_name = {"deployments": "deployment_ids", "__all__": "request"}
    text = "; ".join(f"{api_name.get(field, field)}: {' '.join(errors)}" for field, errors in form.errors.items())
    return HttpError(status, text)


def _json_value(value: Any) -> Any:
    if hasattr(value, "values_list"):  # the deployments a form cleaned
        return sorted(value.values_list("pk", flat=True))
    return value


# --- departments ----------------------------------------------------------------------------------


@router.get("/departments", response=list[DepartmentOut], summary="Departments the caller may see")
def list_departments(request: HttpRequest) -> Any:
    return Department.objects.visible_to(request.user).prefetch_related("deployments")


@router.post("/departments", response={201: DepartmentOut}, summary="Create a department (appliance admin)")
def create_department(request: HttpRequest, payload: DepartmentIn) -> Status:
    admin_required(request, "department.create")
    data = payload.dict()
    data["deployments"] = data.pop("deployment_ids")
    form = DepartmentForm(data)
    if not form.is_valid():
        raise _invalid(form)
    with transaction.atomic():
        department = form.save()
        # Nested: the audit log masks top-level names with "token" in them (tokens_per_day is no secret).
        quotas = {name: form.cleaned_data[name] for name in QUOTA_FIELDS}
        detail = {"priority": department.priority, "quotas": quotas,
                  "deployments": _json_value(form.cleaned_data["deployments"]), "via": "api"}  # fmt: skip
        audit.record(request, "department.create", department, detail=detail)
    return Status(201, department)


@router.get("/departments/{department_id}", response=DepartmentOut, summary="One department")
def get_department(request: HttpRequest, department_id: int) -> Any:
    return _department(request, department_id)


@router.patch("/departments/{department_id}", response=DepartmentOut, summary="Change quotas (appliance admin)")
def update_department(request: HttpRequest, department_id: int, payload: DepartmentPatch) -> Any:
    department = _department(request, department_id)
    admin_required(request, "department.update")
    changes = payload.dict(exclude_unset=True)
    if "deployment_ids" in changes:
        changes["deployments"] = changes.pop("deployment_ids")
    current = {name: getattr(department, name) for name in DepartmentForm._meta.fields if name != "deployments"}
    current["deployments"] = list(department.deployments.values_list("pk", flat=True))
    form = DepartmentForm({**current, **changes}, instance=department)
    if not form.is_valid():
        raise _invalid(form)
    if not form.has_changed():
        return department
    with transaction.atomic():
        form.save()
        changed = {name: _json_value(form.cleaned_data[name]) for name in form.changed_data}
        audit.record(request, "department.update", department, detail={"changed": changed, "via": "api"})
    return Department.objects.prefetch_related("deployments").get(pk=department.pk)


@router.delete("/departments/{department_id}", response={204: None}, summary="Delete a department (appliance admin)")
def delete_department(request: HttpRequest, department_id: int) -> Status:
    department = _department(request, department_id)
    admin_required(request, "department.delete")
    with transaction.atomic():
        audit.record(request, "department.delete", department, detail={"keys": department.api_keys.count(),
                                                                       "via": "api"})  # fmt: skip
        department.delete()  # its keys go with it, so they stop working at once
    return Status(204, None)


# --- members --------------------------------------------------------------------------------------


@router.get("/departments/{department_id}/members", response=list[MemberOut], summary="A department's members")
def list_members(request: HttpRequest, department_id: int) -> Any:
    return _department(request, department_id).memberships.select_related("user").order_by("user__username")


@router.post(
    "/departments/{department_id}/members",
    response={200: MemberOut, 201: MemberOut},
    summary="Add a member or change their role (appliance admin)",
)
def set_member(request: HttpRequest, department_id: int, payload: MemberIn) -> Status:
    department = _department(request, department_id)
    admin_required(request, "department.member_set")
    form = MemberForm(payload.dict())
    if not form.is_valid():
        raise _invalid(form)
    with transaction.atomic():
        membership, created = Membership.objects.update_or_create(
            user=form.cleaned_data["username"], department=department, defaults={"role": form.cleaned_data["role"]}
        )
        detail = {"user": membership.user.username, "role": membership.role, "via": "api"}
        audit.record(request, "department.member_set", department, detail=detail)
    return Status(201 if created else 200, membership)


@router.delete(
    "/departments/{department_id}/members/{username}", response={204: None}, summary="Remove a member (appliance admin)"
)
def remove_member(request: HttpRequest, department_id: int, username: str) -> Status:
    department = _department(request, department_id)
    admin_required(request, "department.member_remove")
    membership = get_object_or_404(department.memberships.select_related("user"), user__username=username)
    with transaction.atomic():
        audit.record(request, "department.member_remove", department, detail={"user": username, "via": "api"})
        membership.delete()
    return Status(204, None)


# --- keys -----------------------------------------------------------------------------------------


@router.get("/departments/{department_id}/keys", response=list[KeyOut], summary="A department's API keys")
def list_keys(request: HttpRequest, department_id: int) -> Any:
    department = _department(request, department_id)
    return (
        ApiKey.objects.visible_to(request.user)
        .filter(department=department)
        .select_related("created_by")
        .prefetch_related("deployments")
    )


@router.get("/departments/{department_id}/keys/{key_id}", response=KeyOut, summary="One API key (never its secret)")
def get_key(request: HttpRequest, department_id: int, key_id: int) -> Any:
    return _key(request, _department(request, department_id), key_id)


@router.post("/departments/{department_id}/keys", response={201: KeyIssuedOut}, summary="Issue a key")
def issue_key(request: HttpRequest, department_id: int, payload: KeyIn, response: HttpResponse) -> Status:
    department = _department(request, department_id)
    _keys_admin_required(request, department, "api_key.issue")
    data = payload.dict()
    data["deployments"] = data.pop("deployment_ids")
    form = KeyApiForm(data, department=department)
    if not form.is_valid():
        # A deployment outside the department's is a refused widening (400), not a malformed request.
        raise _invalid(form, 400 if form.has_error("deployments", "widens") else 422)
    limits = {name: form.cleaned_data[name] for name in KEY_LIMIT_FIELDS}
    with transaction.atomic():
        key, raw = ApiKey.issue(department, form.cleaned_data["name"], request.user, expires_at=form.expires_at(),
                                **limits)  # fmt: skip
        key.deployments.set(form.cleaned_data["deployments"])
        audit.record(request, "api_key.issue", key, detail={"department": department.name, "limits": limits,
                                                            "via": "api"})  # fmt: skip
    response["Cache-Control"] = "no-store"
    key.secret = raw
    return Status(201, key)


@router.post("/departments/{department_id}/keys/{key_id}/revoke", response=KeyOut, summary="Revoke a key now")
def revoke_key(request: HttpRequest, department_id: int, key_id: int) -> Any:
    department = _department(request, department_id)
    key = _key(request, department, key_id)
    _keys_admin_required(request, department, "api_key.revoke")
    if key.revoked_at is None or key.revoked_at > timezone.now():  # also ends a rotation's grace period
        with transaction.atomic():
            key.revoke()
            audit.record(request, "api_key.revoke", key, detail={"via": "api"})
    return key


@router.post(
    "/departments/{department_id}/keys/{key_id}/rotate",
    response={201: KeyIssuedOut},
    summary="Replace a key; the old one keeps working for the grace period",
)
def rotate_key(
    request: HttpRequest, department_id: int, key_id: int, payload: RotateIn, response: HttpResponse
) -> Status:
    department = _department(request, department_id)
    key = _key(request, department, key_id)
    _keys_admin_required(request, department, "api_key.rotate")
    if not key.is_usable or key.replaced_by_id is not None:
        raise HttpError(409, "This key is revoked, expired or already rotated.")
    with transaction.atomic():
        new, raw = key.rotate(timedelta(seconds=payload.grace_seconds), request.user)
        detail = {"replacement": new.pk, "grace_seconds": payload.grace_seconds, "via": "api"}
        audit.record(request, "api_key.rotate", key, detail=detail)
    response["Cache-Control"] = "no-store"
    new = ApiKey.objects.select_related("created_by").prefetch_related("deployments").get(pk=new.pk)
    new.secret = raw
    return Status(201, new)
