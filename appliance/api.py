"""The management API under ``/api/v1/``: JSON, token auth, OpenAPI schema at ``/api/v1/openapi.json``.

Later apps add their routers with ``api.add_router``. Every endpoint asks ``require(request, rule)``
with the rule its page twin uses (``appliance.roles.PERMISSIONS``); lists are scoped by the same
``visible_to(user)``; a refusal is audited like one in the UI. Objects are named by id everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from ninja import Field, NinjaAPI, Query, Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status
from ninja.security import HttpBearer, django_auth
from pydantic import AfterValidator

from appliance import audit, directory, health, oidc
from appliance.forms import TokenCreateForm, UserCreateForm
from appliance.models import ApiToken, AuditEvent, Profile
from appliance.roles import Role, can, role_of


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


def require(request: HttpRequest, rule: str, department: Any = None, action: str = "") -> None:
    """Refuse (403, audited as ``action``) what ``appliance.roles``' table does not allow the caller:
    the same rule, and the same department scope, as the page's."""
    if not can(request.user, rule, department):
        audit.record(request, action or rule, outcome="denied", detail={"path": request.path, "via": "api"})
        raise HttpError(403, f"Your role may not do this ({rule}).")


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


def _in_utc(value: datetime | None) -> datetime | None:
    """A filter instant in UTC: the database keeps UTC, and PostgreSQL refuses offsets past ±15:59
    that Python accepts (seen: a 500 on ``since=0777-01-16T20:03:54-19:12``)."""
    if value is None:
        return None
    if timezone.is_naive(value):
        value = timezone.make_aware(value)
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("out of range once in UTC") from exc


Instant = Annotated[datetime | None, AfterValidator(_in_utc)]


class AuditFilter(Schema):
    actor: str | None = None
    action: str | None = None
    outcome: AuditEvent.Outcome | None = None
    since: Instant = None
    until: Instant = None
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=1_000_000_000)  # unbounded, a huge one overflowed the database's integer: 500


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
    require(request, "audit.view")
    events = AuditEvent.objects.visible_to(request.user)
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
    require(request, "user.manage", action="user.create")
    form = UserCreateForm(payload.dict())
    if not form.is_valid():
        raise HttpError(422, "; ".join(f"{field}: {' '.join(errors)}" for field, errors in form.errors.items()))
    user, password = Profile.create_user(**form.cleaned_data)
    audit.record(request, "user.create", user, detail={"role": form.cleaned_data["role"], "via": "api"})
    role = form.cleaned_data["role"]
    return Status(201, {"id": user.pk, "username": user.username, "role": role, "password": password})


class UserOut(Schema):
    id: int
    username: str
    email: str
    role: str | None
    is_active: bool

    @staticmethod
    def resolve_role(obj: Any) -> str | None:
        profile = getattr(obj, "profile", None)
        return profile.role if profile is not None else None


class RoleIn(Schema):
    role: Role


class ActiveIn(Schema):
    active: bool


@system.get("/users", response=list[UserOut], summary="Users and their roles (appliance admin)")
def list_users(request: HttpRequest) -> Any:
    require(request, "user.view")
    return get_user_model().objects.select_related("profile").order_by("username")


def _other_user(request: HttpRequest, user_id: int, action: str) -> Any:
    require(request, "user.manage", action=action)
    user = get_object_or_404(get_user_model().objects.select_related("profile"), pk=user_id)
    if user == request.user:
        raise HttpError(409, "You cannot change your own role or deactivate yourself.")
    return user


@system.post("/users/{user_id}/role", response=UserOut, summary="Change a user's role (appliance admin)")
def set_user_role(request: HttpRequest, user_id: int, payload: RoleIn) -> Any:
    user = _other_user(request, user_id, "user.set_role")
    if payload.role != Role.APPLIANCE_ADMIN and Profile.is_last_admin(user):
        raise HttpError(409, "This is the last appliance admin.")
    Profile.set_role(user, payload.role)
    audit.record(request, "user.set_role", user, detail={"role": payload.role.value, "via": "api"})
    return get_user_model().objects.select_related("profile").get(pk=user.pk)


@system.post("/users/{user_id}/active", response=UserOut, summary="Activate or deactivate a user (appliance admin)")
def set_user_active(request: HttpRequest, user_id: int, payload: ActiveIn) -> Any:
    user = _other_user(request, user_id, "user.activate" if payload.active else "user.deactivate")
    if not payload.active and Profile.is_last_admin(user):
        raise HttpError(409, "This is the last appliance admin.")
    if user.is_active != payload.active:
        user.is_active = payload.active
        user.save(update_fields=["is_active"])
        audit.record(request, "user.activate" if user.is_active else "user.deactivate", user, detail={"via": "api"})
    return user


class DirectoryOut(Schema):
    enabled: bool
    settings: dict[str, str] = Field(..., description="LDAP_* (or OIDC_*) settings as configured; secrets masked.")
    role_groups: list[tuple[str, str]]
    department_groups: list[tuple[str, str]]


class DirectoryTestOut(Schema):
    ok: bool
    message: str
    users: int
    groups: int
    seconds: float = 0.0


@system.get("/directory", response=DirectoryOut, summary="Directory sign-in settings (appliance admin)")
def directory_settings(request: HttpRequest) -> Any:
    require(request, "directory.view")
    return {"enabled": directory.enabled(), "settings": dict(directory.shown_settings()),
            "role_groups": settings.LDAP_ROLE_GROUPS, "department_groups": settings.LDAP_DEPARTMENT_GROUPS}  # fmt: skip


def _connection_tested(request: HttpRequest, action: str, test: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    require(request, "directory.view")
    result = test()
    audit.record(request, action, outcome="ok" if result["ok"] else "failed", detail={**result, "via": "api"})
    return result


@system.post("/directory/test", response=DirectoryTestOut,
             summary="Bind with the service account and search users and groups (appliance admin)")  # fmt: skip
def directory_test(request: HttpRequest) -> Any:
    return _connection_tested(request, "directory.test", directory.test_connection)


class OidcTestOut(Schema):
    ok: bool
    message: str
    keys: int
    seconds: float = 0.0


@system.get("/directory/oidc", response=DirectoryOut, summary="OpenID Connect sign-in settings (appliance admin)")
def oidc_settings(request: HttpRequest) -> Any:
    require(request, "directory.view")
    return {"enabled": oidc.enabled(), "settings": dict(oidc.shown_settings()),
            "role_groups": settings.OIDC_ROLE_GROUPS, "department_groups": settings.OIDC_DEPARTMENT_GROUPS}  # fmt: skip


@system.post("/directory/oidc/test", response=OidcTestOut,
             summary="Read the provider's discovery document and signing keys (appliance admin)")  # fmt: skip
def oidc_test(request: HttpRequest) -> Any:
    return _connection_tested(request, "directory.oidc_test", oidc.test_connection)


class TokenOut(Schema):
    id: int
    name: str
    hint: str
    state: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenIn(Schema):
    name: str = Field(..., min_length=1, max_length=100)
    expires_in_days: int | None = Field(None, ge=1, le=3650)


class TokenCreatedOut(TokenOut):
    token: str = Field(..., description="The token itself: shown in this response only, stored nowhere.")


@system.get("/tokens", response=list[TokenOut], summary="The caller's API tokens (appliance admin)")
def list_tokens(request: HttpRequest) -> Any:
    require(request, "api_token.view")
    return ApiToken.objects.filter(user=request.user)


@system.post("/tokens", response={201: TokenCreatedOut}, summary="Issue an API token (appliance admin)")
def create_token(request: HttpRequest, payload: TokenIn, response: HttpResponse) -> Status:
    require(request, "api_token.manage", action="api_token.create")
    form = TokenCreateForm(payload.dict())
    if not form.is_valid():
        raise HttpError(422, "; ".join(f"{field}: {' '.join(errors)}" for field, errors in form.errors.items()))
    token, raw = ApiToken.issue(request.user, form.cleaned_data["name"], form.expires_at())
    audit.record(request, "api_token.create", token, detail={"via": "api"})
    response["Cache-Control"] = "no-store"
    token.token = raw
    return Status(201, token)


@system.post("/tokens/{token_id}/revoke", response=TokenOut, summary="Revoke one of the caller's API tokens")
def revoke_token(request: HttpRequest, token_id: int) -> Any:
    require(request, "api_token.manage", action="api_token.revoke")
    token = get_object_or_404(ApiToken, pk=token_id, user=request.user)
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit.record(request, "api_token.revoke", token, detail={"via": "api"})
    return token


api.add_router("/", system)


def _add_app_routers() -> None:
    from gpus.api import router as gpus_router
    from models_catalog.api import router as models_router
    from nodes.api import router as nodes_router
    from provisioning.api import router as deployments_router
    from tenancy.api import router as departments_router

    api.add_router("/", models_router)
    api.add_router("/", deployments_router)
    api.add_router("/", gpus_router)
    api.add_router("/", departments_router)
    api.add_router("/", nodes_router)


_add_app_routers()
