"""The management API under ``/api/v1/``: JSON, token auth, OpenAPI schema at ``/api/v1/openapi.json``.

Later apps add their routers with ``api.add_router``. Reads are open to every role; changes need
an appliance admin (``admin_required``), and a refused change is audited like one in the UI.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.http import HttpRequest
from ninja import Field, NinjaAPI, Query, Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status
from ninja.security import HttpBearer, django_auth

from appliance import audit, health
from appliance.forms import UserCreateForm
from appliance.models import ApiToken, AuditEvent, Profile
from appliance.roles import Role, role_of


class TokenAuth(HttpBearer):
    """``Authorization: Bearer apc_…`` with a token issued on the API tokens page."""

    openapi_scheme = "bearer"

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        found = ApiToken.authenticate(token)
        if found is None:
            return None
        request.user = found.user
        return found.user


api = NinjaAPI(
    title="Appliance console management API",
    version="1",
    urls_namespace="api",
    # The browser session (CSRF-checked) lets the console's own pages call the API too.
    auth=[TokenAuth(), django_auth],
    openapi_url="/openapi.json",
    docs_url="/docs",
)


def admin_required(request: HttpRequest, action: str) -> None:
    if role_of(request.user) != Role.APPLIANCE_ADMIN:
        audit.record(request, action, outcome="denied", detail={"path": request.path, "via": "api"})
        raise HttpError(403, "This action needs the appliance admin role.")


class MeOut(Schema):
    username: str
    role: str | None


class AuditEventOut(Schema):
    id: int
    created_at: datetime
    actor: str = Field(alias="actor_name")
    action: str
    target_type: str
    target_id: str
    target: str = Field(alias="target_repr")
    outcome: str
    source_ip: str | None
    detail: dict


class AuditFilter(Schema):
    actor: str | None = None
    action: str | None = None
    outcome: AuditEvent.Outcome | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0)


class HealthOut(Schema):
    ok: bool
    node: str
    database: dict
    redis: dict
    worker: dict


system = Router(tags=["system"])


@system.get("/me", response=MeOut, summary="Who the caller is")
def me(request: HttpRequest) -> dict[str, Any]:
    role = role_of(request.user)
    return {"username": request.user.get_username(), "role": role.value if role else None}


@system.get("/health", response=HealthOut, summary="Database, Redis and worker liveness")
def system_health(request: HttpRequest) -> dict[str, Any]:
    return health.report()


@system.get("/audit-events", response=list[AuditEventOut], summary="Audit events, newest first")
def audit_events(request: HttpRequest, filters: Query[AuditFilter]) -> Any:
    events = AuditEvent.objects.all()
    if filters.actor:
        events = events.filter(actor_name=filters.actor)
    if filters.action:
        events = events.filter(action=filters.action)
    if filters.outcome:
        events = events.filter(outcome=filters.outcome)
    if filters.since:
        events = events.filter(created_at__gte=filters.since)
    if filters.until:
        events = events.filter(created_at__lt=filters.until)
    return events[filters.offset : filters.offset + filters.limit]


class UserIn(Schema):
    username: str = Field(..., min_length=1, max_length=150, pattern=r"^[\w.@+-]+$")
    email: str = ""
    role: Role = Role.VIEWER


class UserCreatedOut(Schema):
    id: int
    username: str
    role: str
    password: str = Field(..., description="The first password; shown only in this response.")


@system.post("/users", response={201: UserCreatedOut}, summary="Create a user (appliance admin)")
def create_user(request: HttpRequest, payload: UserIn) -> Status:
    admin_required(request, "user.create")
    form = UserCreateForm(payload.dict())
    if not form.is_valid():
        raise HttpError(422, "; ".join(f"{field}: {' '.join(errors)}" for field, errors in form.errors.items()))
    user, password = Profile.create_user(**form.cleaned_data)
    audit.record(request, "user.create", user, detail={"role": form.cleaned_data["role"], "via": "api"})
    role = form.cleaned_data["role"]
    return Status(201, {"id": user.pk, "username": user.username, "role": role, "password": password})


api.add_router("/", system)


def _add_app_routers() -> None:
    from models_catalog.api import router as models_router
    from provisioning.api import router as deployments_router
    from tenancy.api import router as departments_router

    api.add_router("/", models_router)
    api.add_router("/", deployments_router)
    api.add_router("/", departments_router)


_add_app_routers()
