"""Roles and the one place that decides what a user may see and do.

Roles:
- appliance admin: everything (superusers are appliance admins);
- department admin: their own department only (departments arrive with ``tenancy``; the
  ``department_ids`` hook below is where they plug in);
- viewer: read-only.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.db import models
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.translation import gettext_lazy as _


class Role(models.TextChoices):
    APPLIANCE_ADMIN = "appliance_admin", _("Appliance admin")
    DEPARTMENT_ADMIN = "department_admin", _("Department admin")
    VIEWER = "viewer", _("Viewer")


def role_of(user: Any) -> Role | None:
    """The user's role, or None for anonymous and deactivated users."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return None
    if user.is_superuser:
        return Role.APPLIANCE_ADMIN
    profile = getattr(user, "profile", None)
    return Role(profile.role) if profile is not None else Role.VIEWER


def is_appliance_admin(user: Any) -> bool:
    return role_of(user) == Role.APPLIANCE_ADMIN


def department_ids(user: Any) -> set[int] | None:
    """Departments the user may act on: None means all of them, an empty set means none.

    Appliance admins and viewers see the whole appliance; a department admin sees only the
    departments they are a member of, which the tenancy app provides via ``member_department_ids``.
    """
    role = role_of(user)
    if role is None:
        return set()
    if role in (Role.APPLIANCE_ADMIN, Role.VIEWER):
        return None
    lookup = _department_lookup
    return lookup(user) if lookup is not None else set()


_department_lookup: Callable[[Any], set[int]] | None = None


def register_department_lookup(lookup: Callable[[Any], set[int]]) -> None:
    """Called by the tenancy app at start-up to say which departments a user belongs to."""
    global _department_lookup
    _department_lookup = lookup


def forbidden(request: HttpRequest, action: str) -> HttpResponse:
    """Refuse with the console's 403 page and write the refusal to the audit log."""
    from appliance.audit import record

    record(request, action, outcome="denied", detail={"path": request.path})
    return render(request, "403.html", status=403)


def require_role(*allowed: Role, action: str = "") -> Callable:
    """Let only users with one of ``allowed`` roles through; others get 403 and an audit event.

    Anonymous users are sent to the login page first. Pages every role may read use
    ``login_required``; this guards the views that change something.
    """

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            from django.contrib.auth.views import redirect_to_login

            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if role_of(request.user) not in allowed:
                return forbidden(request, action or f"{view.__module__}.{view.__name__}")
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


def role_context(request: HttpRequest) -> dict[str, Any]:
    """Template context: the user's role and whether they may change things."""
    role = role_of(getattr(request, "user", None))
    return {"user_role": role, "can_admin": role == Role.APPLIANCE_ADMIN}
