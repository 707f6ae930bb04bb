"""Holding a user whose password must be changed (the first admin's printed one) at the change page.

Every page redirects to the password change page, and the management API answers 403, for a
signed-in user whose profile says so, until the password is changed. Only the change page itself,
logging out, the language switch and what needs no session (static files, health, metrics, the
hub mirror, which take no session) stay reachable.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.urls import reverse

from appliance.models import Profile

API_MESSAGE = (
    "This account must change its password before using the console: "
    "sign in on the web page and choose a new password first."
)


@cache
def _exempt_prefixes() -> tuple[str, ...]:
    return (
        reverse("password-change"),
        reverse("logout"),
        reverse("set_language"),
        reverse("healthz"),
        reverse("metrics"),
        "/hf/",
        settings.STATIC_URL,
    )


def _refuse(request: HttpRequest) -> HttpResponse:
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": API_MESSAGE}, status=403)
    return redirect("password-change")


class PasswordChangeRequiredMiddleware:
    """Sync and async: the hub mirror's async views must not be pushed onto a thread by it."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable) -> None:
        self.get_response = get_response
        if iscoroutinefunction(self.get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if iscoroutinefunction(self):
            return self.__acall__(request)
        if not request.path.startswith(_exempt_prefixes()) and Profile.password_change_required(request.user):
            return _refuse(request)
        return self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        if not request.path.startswith(_exempt_prefixes()):
            user = await request.auser()
            if await sync_to_async(Profile.password_change_required)(user):
                return _refuse(request)
        return await self.get_response(request)
