"""Roles and the one table that decides who may see and do what.

Roles (``Profile.role``; the profile is what counts, ``is_superuser`` included):
- appliance admin: everything;
- operator: runs the box (models, engines, deployments, GPU alerts), reads what a global viewer
  reads; never users, departments' keys, members, quotas or prices;
- global viewer: reads everything except users, engine logs, webhooks and API tokens;
- department admin: their departments only (those they are a member of): reads them, their keys,
  usage, audit events and the deployments they may use; manages keys where their membership is
  "department admin"; a "viewer" membership is read-only;
- department viewer: reads their departments as a department admin does, changes nothing.

``PERMISSIONS`` maps each action to the roles allowed; pages (``requires``) and the management
API (``appliance.api.require``) both ask ``can``/``allowed``, and the models' ``can_*`` methods
ask ``can`` with the object's department, so a page and its API twin cannot disagree.
Department roles are scoped: ``department_ids(user)`` is what ``visible_to(user)`` querysets read.

Break glass: a user without a profile row who is a superuser (``manage.py createsuperuser``) is an
appliance admin; ``manage.py set_role <user> appliance_admin`` on the appliance's shell restores a
demoted admin. Demoting a superuser in the console takes effect like any other demotion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from django.db import models
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext_lazy as _


class Role(models.TextChoices):
    APPLIANCE_ADMIN = "appliance_admin", _("Appliance admin")
    OPERATOR = "operator", _("Operator")
    VIEWER = "viewer", _("Global viewer")
    DEPARTMENT_ADMIN = "department_admin", _("Department admin")
    DEPARTMENT_VIEWER = "department_viewer", _("Department viewer")


DEPARTMENT_ROLES = frozenset({Role.DEPARTMENT_ADMIN, Role.DEPARTMENT_VIEWER})
# The membership role that lets a department admin change things in that department
# (``tenancy.Membership.Role.ADMIN``); any other membership is read-only.
MEMBER_ADMIN = "department_admin"


@dataclass(frozen=True)
class Rule:
    """Who may do an action. For department roles the action is scoped to their departments;
    ``changes`` ones also need a department admin membership of the object's department."""

    roles: frozenset[Role]
    changes: bool = False


_A, _O, _V, _DA, _DV = Role.APPLIANCE_ADMIN, Role.OPERATOR, Role.VIEWER, Role.DEPARTMENT_ADMIN, Role.DEPARTMENT_VIEWER
_ADMIN = frozenset({_A})
_OPS = frozenset({_A, _O})
_READERS = frozenset({_A, _O, _V})
_EVERYONE = frozenset(Role)

PERMISSIONS: dict[str, Rule] = {
    # Appliance admins only, reading included.
    "user.view": Rule(_ADMIN),
    "user.manage": Rule(_ADMIN, changes=True),
    "directory.view": Rule(_ADMIN),  # directory sign-in settings and their connection test
    "api_token.view": Rule(_ADMIN),
    "api_token.manage": Rule(_ADMIN, changes=True),
    "engine_log.view": Rule(_ADMIN),
    "webhook.view": Rule(_ADMIN),
    "webhook.manage": Rule(_ADMIN, changes=True),
    "hub_endpoint.manage": Rule(_ADMIN, changes=True),
    "model.allow_remote_code": Rule(_ADMIN, changes=True),
    "department.manage": Rule(_ADMIN, changes=True),
    "member.manage": Rule(_ADMIN, changes=True),
    "price.set": Rule(_ADMIN, changes=True),
    "usage.set_aside.view": Rule(_ADMIN),  # usage entries the database refused, raw
    "node.manage": Rule(_ADMIN, changes=True),  # join tokens hand out the cluster's settings
    # The box: read by global roles, run by operators.
    "model.view": Rule(_READERS),
    "runtime.view": Rule(_READERS),
    "gpu.view": Rule(_READERS),
    "node.view": Rule(_READERS),
    "backup.view": Rule(_READERS),  # the last backup's outcome on the Overview
    "cost.view": Rule(_READERS),  # what each deployment's GPU time bought (tenancy.costs)
    "model.manage": Rule(_OPS, changes=True),
    "runtime.install": Rule(_OPS, changes=True),
    "deployment.manage": Rule(_OPS, changes=True),
    "alert.acknowledge": Rule(_OPS, changes=True),
    # Everyone, department roles scoped to their departments.
    "overview.view": Rule(_EVERYONE),
    "audit.view": Rule(_EVERYONE),
    "deployment.view": Rule(_EVERYONE),
    "department.view": Rule(_EVERYONE),
    "member.view": Rule(_EVERYONE),
    "api_key.view": Rule(_EVERYONE),
    "usage.view": Rule(_EVERYONE),
    "price.view": Rule(_EVERYONE),
    "api_key.manage": Rule(frozenset({_A, _DA}), changes=True),
    # Trying a deployment spends a department's quota: its admins, and the box's admins and operators.
    "playground.use": Rule(frozenset({_A, _O, _DA})),  # on departments they administer: gateway.playground
}


def role_of(user: Any) -> Role | None:
    """The user's role, or None for anonymous and deactivated users. The profile's role counts,
    for superusers too; only a superuser without a profile (break glass) is an appliance admin."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return None
    profile = getattr(user, "profile", None)
    if profile is not None:
        return Role(profile.role)
    return Role.APPLIANCE_ADMIN if user.is_superuser else Role.DEPARTMENT_VIEWER


def is_appliance_admin(user: Any) -> bool:
    return role_of(user) == Role.APPLIANCE_ADMIN


_department_lookup: Callable[[Any], Mapping[int, str]] | None = None


def register_department_lookup(lookup: Callable[[Any], Mapping[int, str]]) -> None:
    """Called by the tenancy app at start-up: ``lookup(user)`` gives {department id: membership role}."""
    global _department_lookup
    _department_lookup = lookup


_department_events: Callable[[set[int]], Any] | None = None


def register_department_events(events: Callable[[set[int]], Any]) -> None:
    """Called by the tenancy app: ``events(ids)`` gives the Q of audit events about those departments."""
    global _department_events
    _department_events = events


def department_events(ids: set[int]) -> Any:
    """The Q of audit events about the departments ``ids`` (none without the tenancy hook)."""
    from django.db.models import Q

    return _department_events(ids) if _department_events is not None and ids else Q(pk__in=[])


def _memberships(user: Any) -> Mapping[int, str]:
    lookup = _department_lookup
    return lookup(user) if lookup is not None else {}


def department_ids(user: Any) -> set[int] | None:
    """Departments the user may see: None means all of them, an empty set means none.

    Global roles see the whole appliance; department roles see the departments they are a
    member of (with any membership role); without the tenancy lookup, none.
    """
    role = role_of(user)
    if role is None:
        return set()
    if role not in DEPARTMENT_ROLES:
        return None
    return set(_memberships(user))


def managed_department_ids(user: Any) -> set[int] | None:
    """Departments whose keys the user may change: None means all (appliance admins)."""
    role = role_of(user)
    if role == Role.APPLIANCE_ADMIN:
        return None
    if role != Role.DEPARTMENT_ADMIN:
        return set()
    return {pk for pk, member_role in _memberships(user).items() if member_role == MEMBER_ADMIN}


def allowed(user: Any, action: str) -> bool:
    """Whether the user's role may do ``action`` at all (before any department scoping)."""
    return role_of(user) in PERMISSIONS[action].roles


def can(user: Any, action: str, department: Any = None) -> bool:
    """Whether the user may do ``action`` (to something of ``department``, an object or id).

    For department roles: with a department, it must be one of theirs (and one they administer
    for changes); without one, only reading passes (lists are then scoped by ``visible_to``).
    """
    role = role_of(user)
    rule = PERMISSIONS[action]
    if role is None or role not in rule.roles:
        return False
    if role not in DEPARTMENT_ROLES:
        return True
    if department is None:
        return not rule.changes
    department_id = department if isinstance(department, int) else department.pk
    scope = managed_department_ids(user) if rule.changes else department_ids(user)
    return scope is None or department_id in scope


def can_any(user: Any, action: str, departments: Any) -> bool:
    """``can`` for an object shared by several departments (a deployment): one of them suffices."""
    return any(can(user, action, department) for department in departments)


class Permissions(dict):
    """The user's role-level permissions for templates: ``{% if can.deployment_manage %}``."""

    def __init__(self, user: Any) -> None:
        super().__init__((action.replace(".", "_"), can(user, action)) for action in PERMISSIONS)


def forbidden(request: HttpRequest, action: str) -> HttpResponse:
    """Refuse with the console's 403 page and write the refusal to the audit log."""
    from appliance.audit import record

    record(request, action, outcome="denied", detail={"path": request.path})
    return render(request, "403.html", status=403)


def login_redirect(request: HttpRequest) -> HttpResponse:
    """Send an anonymous user to the login page, and back afterwards. A form sent after the session
    expired comes back to the page the form was on (the Referer, on this site only), not to the URL
    it posts to, which answers GET with 405; the page then puts back what was typed
    (dashboard/static/dashboard/forms.js)."""
    from django.contrib.auth.views import redirect_to_login

    target = request.get_full_path()
    referer = request.headers.get("Referer", "")
    if request.method not in ("GET", "HEAD") and url_has_allowed_host_and_scheme(
        referer, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        parts = urlsplit(referer)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
    return redirect_to_login(target)


def requires(action: str, per_action: Mapping[str, str] | None = None) -> Callable:
    """Guard a page with the rule for ``action``: anonymous users go to the login page, roles the
    table does not allow get 403 and an audit event. A view taking an ``action`` URL argument names
    the rule of each action it knows in ``per_action`` (others are 404). Department scoping of the
    object itself is the view's (``visible_to``, the models' ``can_*`` methods).

    The rule is kept on the view (``view.rule``) for the role × URL tests."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not request.user.is_authenticated:
                return login_redirect(request)
            wanted = action
            if per_action is not None:
                if kwargs.get("action") not in per_action:
                    return render(request, "404.html", status=404)
                wanted = per_action[kwargs["action"]]
            if not allowed(request.user, wanted):
                return forbidden(request, wanted)
            return view(request, *args, **kwargs)

        wrapper.rule = action  # type: ignore[attr-defined]
        wrapper.per_action = dict(per_action or {})  # type: ignore[attr-defined]
        return wrapper

    return decorator


def require_role(*allowed_roles: Role, action: str = "") -> Callable:
    """Let only users with one of ``allowed_roles`` through (prefer ``requires`` and the table)."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not request.user.is_authenticated:
                return login_redirect(request)
            if role_of(request.user) not in allowed_roles:
                return forbidden(request, action or f"{view.__module__}.{view.__name__}")
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


def role_context(request: HttpRequest) -> dict[str, Any]:
    """Template context: the user's role and what it may do (``can.<action with _>``)."""
    user = getattr(request, "user", None)
    role = role_of(user)
    return {"user_role": role, "can_admin": role == Role.APPLIANCE_ADMIN, "can": Permissions(user)}
