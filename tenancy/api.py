"""Departments, their members and API keys in the management API (``/api/v1/departments``), and the
usage and chargeback figures the Usage and Chargeback pages show (``/api/v1/usage``, ``/chargeback``).

Scoped like the pages: every lookup goes through ``visible_to(user)``, so a department admin gets 404
for anything of another department. Who may do what is ``appliance.roles``' table, asked through
``require`` and the models' ``can_*`` methods exactly as the pages ask it. Refusals are audited.
Input is checked by the pages' forms (``tenancy.forms``), so the API and the UI refuse the same
things. A key's secret is in the issue and rotate responses only: never listed, never audited.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import get_object_or_404
from django.utils import timezone
from ninja import Field, Query, Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status
from pydantic import StrictBool, StrictInt

from appliance import audit
from appliance.api import require
from tenancy import keys, reports
from tenancy.forms import DepartmentForm, KeyApiForm, MemberForm, ModelPriceForm, MonthForm, UsageFilterForm
from tenancy.models import ApiKey, Department, Membership, ModelPrice, SetAsideUsage, price_detail

router = Router(tags=["departments"])

QUOTA_FIELDS = ("rpm", "tpm", "tokens_per_day", "tokens_per_month", "max_concurrency", "max_tokens_per_request")
KEY_LIMIT_FIELDS = ("rpm", "tpm", "max_concurrency", "max_tokens_per_request")
MAX_GRACE_SECONDS = ApiKey.ROTATION_GRACE_MAX_MINUTES * 60  # as the page's rotate form
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
    user_id: int
    username: str = Field(alias="user.username")
    role: str


class MemberIn(Schema):
    user_id: int | None = Field(None, description="The user's id (or give ``username``).")
    username: str | None = None
    role: str = Membership.Role.VIEWER


class PriceOut(Schema):
    id: int
    model: str
    prompt_per_million: str
    completion_per_million: str
    gpu_hour: str

    @staticmethod
    def resolve_prompt_per_million(obj: ModelPrice) -> str:
        return str(obj.prompt_per_million)

    @staticmethod
    def resolve_completion_per_million(obj: ModelPrice) -> str:
        return str(obj.completion_per_million)

    @staticmethod
    def resolve_gpu_hour(obj: ModelPrice) -> str:
        return str(obj.gpu_hour)


class PriceIn(Schema):
    model: str = Field(..., description="The served model name (a deployment's name).")
    prompt_per_million: Decimal = Field(Decimal(0), description="Per million prompt tokens.")
    completion_per_million: Decimal = Field(Decimal(0), description="Per million completion tokens.")
    gpu_hour: Decimal = Field(Decimal(0), description="Per GPU-hour.")


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
    all_deployments: bool = Field(..., description="True: every deployment of the department, now and later.")
    deployment_ids: list[int] = Field(
        ..., description="With all_deployments false, exactly the deployments the key may use (empty: none)."
    )

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
    all_deployments: StrictBool | None = Field(
        None,
        description="True: every deployment of the department, now and later. False: exactly deployment_ids "
        "(an empty list allows none). Left out: true without deployment_ids, false with them.",
    )
    deployment_ids: list[int] = Field(
        default_factory=list, max_length=1000, description="Only deployments of the department (not deleted ones)."
    )


class RotateIn(Schema):
    grace_seconds: int = Field(
        ApiKey.ROTATION_GRACE_DEFAULT_MINUTES * 60, ge=0, le=MAX_GRACE_SECONDS,
        description="How long the old key keeps working (at most 7 days, as on the page).",
    )  # fmt: skip


# --- scoping and refusals -------------------------------------------------------------------------


def _department(request: HttpRequest, department_id: int) -> Department:
    """The department if the caller may see it and it is not deleted (archived); 404 otherwise."""
    return get_object_or_404(Department.objects.visible_to(request.user).active(), pk=department_id)


def _key(request: HttpRequest, department: Department, key_id: int) -> ApiKey:
    keys_seen = (
        ApiKey.objects.visible_to(request.user).active().select_related("created_by").prefetch_related("deployments")
    )
    return get_object_or_404(keys_seen, pk=key_id, department=department)


def _keys_admin_required(request: HttpRequest, department: Department, action: str) -> None:
    if not department.can_manage_keys(request.user):
        audit.record(request, action, department, outcome="denied", detail={"path": request.path, "via": "api"})
        raise HttpError(403, "Managing this department's keys needs its department admin or an appliance admin.")


def _refused_deployments(form: forms.BaseForm) -> bool:
    """Deployments of another department, or deleted ones: a refused choice (400), not malformed input."""
    return form.has_error("deployments", "widens") or form.has_error("deployments", "archived")


def _invalid(form: forms.BaseForm, status: int | None = None) -> HttpError:
    """The form's errors as one message, fields named as the API names them."""
    status = status or (400 if _refused_deployments(form) else 422)
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
    require(request, "department.view")
    return Department.objects.visible_to(request.user).active().prefetch_related("deployments")


@router.post("/departments", response={201: DepartmentOut}, summary="Create a department (appliance admin)")
def create_department(request: HttpRequest, payload: DepartmentIn) -> Status:
    require(request, "department.manage", action="department.create")
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
    require(request, "department.view")
    return _department(request, department_id)


@router.patch("/departments/{department_id}", response=DepartmentOut, summary="Change quotas (appliance admin)")
def update_department(request: HttpRequest, department_id: int, payload: DepartmentPatch) -> Any:
    department = _department(request, department_id)
    require(request, "department.manage", department, action="department.update")
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


@router.delete(
    "/departments/{department_id}",
    response={204: None},
    summary="Delete a department (appliance admin); archived instead while usage refers to it",
    description="Its keys stop working at once. A department that past usage refers to is archived, not "
    "deleted: it leaves the lists, but past usage, CSV exports and chargeback stay as they were, and its "
    "name stays reserved.",
)
def delete_department(request: HttpRequest, department_id: int) -> Status:
    department = _department(request, department_id)
    require(request, "department.manage", department, action="department.delete")
    with transaction.atomic():
        keys_count = department.api_keys.active().count()
        outcome = department.remove()
        audit.record(request, "department.delete", department, detail={"keys": keys_count, "outcome": outcome,
                                                                       "via": "api"})  # fmt: skip
    return Status(204, None)


# --- members --------------------------------------------------------------------------------------


@router.get("/departments/{department_id}/members", response=list[MemberOut], summary="A department's members")
def list_members(request: HttpRequest, department_id: int) -> Any:
    department = _department(request, department_id)
    require(request, "member.view", department)
    return department.memberships.select_related("user").order_by("user__username")


@router.post(
    "/departments/{department_id}/members",
    response={200: MemberOut, 201: MemberOut},
    summary="Add a member or change their role (appliance admin)",
)
def set_member(request: HttpRequest, department_id: int, payload: MemberIn) -> Status:
    department = _department(request, department_id)
    require(request, "member.manage", department, action="department.member_set")
    data = payload.dict()
    if data.get("user_id") is not None:
        user = get_user_model().objects.filter(pk=data["user_id"]).first()
        data["username"] = user.username if user is not None else ""
    form = MemberForm(data)
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
    "/departments/{department_id}/members/{user_id}", response={204: None}, summary="Remove a member (appliance admin)"
)
def remove_member(request: HttpRequest, department_id: int, user_id: int) -> Status:
    department = _department(request, department_id)
    require(request, "member.manage", department, action="department.member_remove")
    membership = get_object_or_404(department.memberships.select_related("user"), user_id=user_id)
    with transaction.atomic():
        detail = {"user": membership.user.username, "via": "api"}
        audit.record(request, "department.member_remove", department, detail=detail)
        membership.delete()
    return Status(204, None)


# --- keys -----------------------------------------------------------------------------------------


@router.get("/departments/{department_id}/keys", response=list[KeyOut], summary="A department's API keys")
def list_keys(request: HttpRequest, department_id: int) -> Any:
    department = _department(request, department_id)
    require(request, "api_key.view", department)
    return (
        ApiKey.objects.visible_to(request.user)
        .active()
        .filter(department=department)
        .select_related("created_by")
        .prefetch_related("deployments")
    )


@router.get("/departments/{department_id}/keys/{key_id}", response=KeyOut, summary="One API key (never its secret)")
def get_key(request: HttpRequest, department_id: int, key_id: int) -> Any:
    require(request, "api_key.view")
    return _key(request, _department(request, department_id), key_id)


@router.post("/departments/{department_id}/keys", response={201: KeyIssuedOut}, summary="Issue a key")
def issue_key(request: HttpRequest, department_id: int, payload: KeyIn, response: HttpResponse) -> Status:
    department = _department(request, department_id)
    _keys_admin_required(request, department, "api_key.issue")
    data = payload.dict()
    data["deployments"] = data.pop("deployment_ids")
    if data["all_deployments"] is None:
        data["all_deployments"] = not data["deployments"]
    form = KeyApiForm(data, department=department)
    if not form.is_valid():
        # A deployment outside the department's or a deleted one is a refused choice (400), not malformed.
        raise _invalid(form)
    limits = {name: form.cleaned_data[name] for name in KEY_LIMIT_FIELDS}
    chosen = form.cleaned_data["deployments"]
    with transaction.atomic():
        key, raw = ApiKey.issue(department, form.cleaned_data["name"], request.user, deployments=chosen,
                                expires_at=form.expires_at(), all_deployments=form.cleaned_data["all_deployments"],
                                **limits)  # fmt: skip
        detail = {"department": department.name, "limits": limits, "all_deployments": key.all_deployments,
                  "deployments": _json_value(chosen), "via": "api"}  # fmt: skip
        audit.record(request, "api_key.issue", key, detail=detail)
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


@router.delete(
    "/departments/{department_id}/keys/{key_id}",
    response={204: None},
    summary="Delete a key; archived instead while usage refers to it",
    description="The key stops working at once and leaves the lists. A key that past usage refers to is "
    "archived, not deleted, so past usage, CSV exports and chargeback stay as they were.",
)
def delete_key(request: HttpRequest, department_id: int, key_id: int) -> Status:
    department = _department(request, department_id)
    key = _key(request, department, key_id)
    _keys_admin_required(request, department, "api_key.delete")
    with transaction.atomic():
        outcome = key.remove()
        audit.record(request, "api_key.delete", key, detail={"outcome": outcome, "via": "api"})
    return Status(204, None)


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


# --- prices ---------------------------------------------------------------------------------------


@router.get("/prices", response=list[PriceOut], summary="Prices of served models (for chargeback)")
def list_prices(request: HttpRequest) -> Any:
    require(request, "price.view")
    return ModelPrice.visible_to(request.user)


@router.post("/prices", response={200: PriceOut, 201: PriceOut}, summary="Set a model's prices (appliance admin)")
def set_price(request: HttpRequest, payload: PriceIn) -> Status:
    require(request, "price.set", action="model_price.set")
    form = ModelPriceForm(payload.dict())
    if not form.is_valid():
        raise _invalid(form)
    fields = ("prompt_per_million", "completion_per_million", "gpu_hour")
    with transaction.atomic():
        price, created = ModelPrice.objects.get_or_create(model=form.cleaned_data["model"])
        before = None if created else {name: str(getattr(price, name)) for name in fields}
        for name in fields:
            setattr(price, name, form.cleaned_data[name])
        price.save()
        price.refresh_from_db()
        detail = {"before": before, "via": "api"} | {name: str(getattr(price, name)) for name in fields}
        audit.record(request, "model_price.set", price, detail=detail)
    return Status(201 if created else 200, price)


@router.delete("/prices/{price_id}", response={204: None}, summary="Remove a model's prices (appliance admin)")
def delete_price(request: HttpRequest, price_id: int) -> Status:
    require(request, "price.set", action="model_price.delete")
    price = get_object_or_404(ModelPrice, pk=price_id)
    with transaction.atomic():
        audit.record(request, "model_price.delete", price, detail=price_detail(price) | {"via": "api"})
        price.delete()
    return Status(204, None)


# --- usage, chargeback, set-aside entries (the Usage and Chargeback pages' figures) ---------------


class TotalsOut(Schema):
    label: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    tokens: int
    avg_latency_ms: float | None
    avg_ttft_ms: float | None


class UsageOut(Schema):
    start: date
    end: date
    group: str
    total: TotalsOut
    rows: list[TotalsOut]


class UsageQuery(Schema):
    start: str = Field("", max_length=10, description="First UTC day, YYYY-MM-DD (default: 7 days before end)")
    end: str = Field("", max_length=10, description="Last UTC day, YYYY-MM-DD (default: today)")
    department: list[int] = Field([], max_length=1000, description="Department ids (none: all the caller may see)")
    group: str = Field("department", max_length=20, description="department, key or model")


@router.get(
    "/usage",
    response=UsageOut,
    summary="Usage of the departments the caller may see, summed by department, key or model",
    description="The Usage page's figures, read the same way and scoped the same way.",
)
def usage_report(request: HttpRequest, query: Query[UsageQuery]) -> Any:
    require(request, "usage.view")
    data = QueryDict(mutable=True)
    data.update({"start": query.start, "end": query.end, "group": query.group})
    data.setlist("department", [str(d) for d in query.department])
    form = UsageFilterForm(data, user=request.user)
    if not form.is_valid():
        raise _invalid(form, 422)
    span = form.range()
    rows = reports.scoped_rollups(request.user, span, form.department_ids())
    found = reports.report(rows, form.cleaned_data["group"], span)
    return {"start": span.first, "end": span.last, "group": form.cleaned_data["group"],
            "total": _totals_out(found.totals), "rows": [_totals_out(t) for t in found.breakdown]}  # fmt: skip


def _totals_out(totals: reports.Totals) -> dict[str, Any]:
    return {"label": str(totals.label), "requests": totals.requests, "errors": totals.errors,
            "prompt_tokens": totals.prompt_tokens, "completion_tokens": totals.completion_tokens,
            "tokens": totals.tokens, "avg_latency_ms": totals.avg_latency_ms,
            "avg_ttft_ms": totals.avg_ttft_ms}  # fmt: skip


class ChargeLineOut(Schema):
    model: str
    prompt_tokens: int
    completion_tokens: int
    token_cost: Decimal
    gpu_hours: Decimal
    gpu_cost: Decimal
    total: Decimal
    priced: bool


class DepartmentChargeOut(Schema):
    department_id: int
    department: str
    tokens: int
    token_cost: Decimal
    gpu_hours: Decimal
    gpu_cost: Decimal
    total: Decimal
    lines: list[ChargeLineOut]


class UnallocatedOut(Schema):
    model: str
    gpu_hours: Decimal
    gpu_cost: Decimal


class ChargebackOut(Schema):
    month: str
    currency: str
    total: Decimal
    departments: list[DepartmentChargeOut]
    unallocated: list[UnallocatedOut]


@router.get("/chargeback", response=ChargebackOut, summary="A month's charges of the departments the caller may see")
def chargeback_report(request: HttpRequest, month: str = "") -> Any:
    require(request, "usage.view")
    form = MonthForm({"month": month})
    if not form.is_valid():
        raise _invalid(form, 422)
    found = reports.chargeback(request.user, form.cleaned_data["month"])
    departments = [
        {"department_id": c.department.pk, "department": c.department.name, "tokens": c.tokens,
         "token_cost": c.token_cost, "gpu_hours": c.gpu_hours, "gpu_cost": c.gpu_cost, "total": c.total,
         "lines": [{**vars(line), "total": line.total} for line in c.lines]}
        for c in found.departments
    ]  # fmt: skip
    return {"month": f"{found.month:%Y-%m}", "currency": settings.CURRENCY, "total": found.total,
            "departments": departments,
            "unallocated": [vars(u) for u in found.unallocated]}  # fmt: skip


class SetAsideOut(Schema):
    stream_id: str
    set_aside_at: datetime
    reason: str
    fields: str


class Page(Schema):
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=1_000_000_000)


@router.get(
    "/usage/set-aside",
    response=list[SetAsideOut],
    summary="Usage entries the database refused (appliance admin)",
    description="Not billed; kept as they came from the gateway (ASCII-escaped JSON), with the reason.",
)
def set_aside_usage(request: HttpRequest, page: Query[Page]) -> Any:
    require(request, "usage.set_aside.view")
    return SetAsideUsage.objects.all()[page.offset : page.offset + page.limit]
