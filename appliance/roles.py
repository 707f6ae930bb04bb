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
from urllib.parse import urlsplit

from django.db import models
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.http import url_has_allowed_host_and_scheme
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


def require_role(*allowed: Role, action: str = "") -> Callable:
    """Let only users with one of ``allowed`` roles through; others get 403 and an audit event.

    Anonymous users are sent to the login page first. Pages every role may read use
    ``login_required``; this guards the views that change something.
    """

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not request.user.is_authenticated:
                return login_redirect(request)
            if role_of(request.user) not in allowed:
                return forbidden(request, action or f"{view.__module__}.{view.__name__}")
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


def role_context(request: HttpRequest) -> dict[str, Any]:
    """Template context: the user's role and whether they may change things."""
    role = role_of(getattr(request, "user", None))
    return {"user_role": role, "can_admin": role == Role.APPLIANCE_ADMIN}
