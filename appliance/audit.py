"""Writing audit events: who changed what, from where. Login and logout are recorded here too."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db import models
from django.dispatch import receiver
from django.http import HttpRequest

# Never stored in an event's detail, whatever a caller passes.
_SECRET_WORDS = ("password", "token", "secret", "key")


def client_ip(request: HttpRequest | None) -> str | None:
    """The caller's address: REMOTE_ADDR, or the X-Forwarded-For entry set by a trusted proxy."""
    if request is None:
        return None
    proxies = settings.AXES_IPWARE_PROXY_COUNT or 0
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if proxies and forwarded:
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if len(hops) >= proxies:
            return hops[-proxies]
    return request.META.get("REMOTE_ADDR") or None


def _clean(detail: dict[str, Any]) -> dict[str, Any]:
    return {
        key: ("***" if any(word in key.lower() for word in _SECRET_WORDS) else value) for key, value in detail.items()
    }


def record(
    request: HttpRequest | None,
    action: str,
    target: models.Model | None = None,
    *,
    outcome: str = "ok",
    detail: dict[str, Any] | None = None,
    actor: Any = None,
) -> Any:
    """Write one audit event. ``actor`` defaults to the request's user."""
    from appliance.models import AuditEvent

    if actor is None and request is not None:
        actor = getattr(request, "user", None)
    if actor is not None and not getattr(actor, "is_authenticated", False):
        actor = None
    return AuditEvent.objects.create(
        actor=actor,
        actor_name=actor.get_username() if actor is not None else "",
        action=action,
        target_type=target._meta.label_lower if target is not None else "",
        target_id=str(target.pk) if target is not None else "",
        target_repr=str(target)[:255] if target is not None else "",
        outcome=outcome,
        source_ip=client_ip(request),
        detail=_clean(detail or {}),
    )


@receiver(user_logged_in)
def _logged_in(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    record(request, "auth.login", actor=user)


@receiver(user_logged_out)
def _logged_out(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    if user is not None:
        record(request, "auth.logout", actor=user)


@receiver(user_login_failed)
def _login_failed(sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **kwargs: Any) -> None:
    record(
        request,
        "auth.login_failed",
        outcome="failed",
        detail={"username": str(credentials.get("username", ""))[:150]},
    )
