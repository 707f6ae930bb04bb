"""Project-wide pages: health, audit log, users and API tokens, and the error pages."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from appliance import audit, health
from appliance.forms import AuditFilterForm, RoleForm, TokenCreateForm, UserCreateForm
from appliance.models import ApiToken, AuditEvent, Profile
from appliance.roles import Role, require_role

admin_only = require_role(Role.APPLIANCE_ADMIN)


@require_GET
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    state = health.report()
    return JsonResponse(state, status=200 if state["ok"] else 503)


@login_required
@require_GET
def audit_log(request: HttpRequest) -> HttpResponse:
    form = AuditFilterForm(request.GET or None)
    events = form.apply(AuditEvent.objects.all()) if request.GET else AuditEvent.objects.all()
    page = Paginator(events, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "appliance/audit.html",
        {"form": form, "page": page, "query": query.urlencode(), "nav": "audit"},
    )


@login_required
@require_GET
def user_list(request: HttpRequest) -> HttpResponse:
    users = get_user_model().objects.select_related("profile").order_by("username")
    return render(request, "appliance/users.html", {"users": users, "form": UserCreateForm(), "nav": "settings"})


@require_POST
@admin_only
def user_create(request: HttpRequest) -> HttpResponse:
    form = UserCreateForm(request.POST)
    if not form.is_valid():
        users = get_user_model().objects.select_related("profile").order_by("username")
        return render(request, "appliance/users.html", {"users": users, "form": form, "nav": "settings"}, status=400)
    user, password = Profile.create_user(**form.cleaned_data)
    audit.record(request, "user.create", user, detail={"role": form.cleaned_data["role"]})
    return render(
        request,
        "appliance/secret_reveal.html",
        {
            "title": _("User created"),
            "explain": _("Give this first password to %(user)s. It is shown only once.") % {"user": user.username},
            "secret": password,
            "back": "users",
            "nav": "settings",
        },
    )


@require_POST
@admin_only
def user_set_role(request: HttpRequest, user_id: int) -> HttpResponse:
    user = get_object_or_404(get_user_model(), pk=user_id)
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("Unknown role."))
        return redirect("users")
    if user == request.user:
        messages.error(request, _("You cannot change your own role."))
        return redirect("users")
    Profile.objects.update_or_create(user=user, defaults={"role": form.cleaned_data["role"]})
    audit.record(request, "user.set_role", user, detail={"role": form.cleaned_data["role"]})
    messages.success(request, _("Role of %(user)s changed.") % {"user": user.username})
    return redirect("users")


@require_POST
@admin_only
def user_toggle_active(request: HttpRequest, user_id: int) -> HttpResponse:
    user = get_object_or_404(get_user_model(), pk=user_id)
    if user == request.user:
        messages.error(request, _("You cannot deactivate yourself."))
        return redirect("users")
    user.is_active = not user.is_active
    user.save(update_fields=["is_active"])
    audit.record(request, "user.activate" if user.is_active else "user.deactivate", user)
    return redirect("users")


@login_required
@require_GET
def token_list(request: HttpRequest) -> HttpResponse:
    tokens = ApiToken.objects.filter(user=request.user)
    return render(request, "appliance/tokens.html", {"tokens": tokens, "form": TokenCreateForm(), "nav": "settings"})


@require_POST
@admin_only
@never_cache
def token_create(request: HttpRequest) -> HttpResponse:
    form = TokenCreateForm(request.POST)
    if not form.is_valid():
        tokens = ApiToken.objects.filter(user=request.user)
        return render(request, "appliance/tokens.html", {"tokens": tokens, "form": form, "nav": "settings"}, status=400)
    token, raw = ApiToken.issue(request.user, form.cleaned_data["name"], form.expires_at())
    audit.record(request, "api_token.create", token)
    return render(
        request,
        "appliance/secret_reveal.html",
        {
            "title": _("API token created"),
            "explain": _("Copy the token now: it is shown only once and cannot be recovered."),
            "secret": raw,
            "back": "tokens",
            "nav": "settings",
        },
    )


@require_POST
@admin_only
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    # Scoped to the caller's own tokens: another admin's token id is a 404, not a revocation.
    token = get_object_or_404(ApiToken, pk=token_id, user=request.user)
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit.record(request, "api_token.revoke", token)
    return redirect("tokens")


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return render(request, "404.html", status=404)


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return render(request, "403.html", status=403)


def server_error(request: HttpRequest) -> HttpResponse:
    return render(request, "500.html", status=500)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    audit.record(request, "security.csrf_refused", outcome="denied", detail={"path": request.path})
    return render(request, "403_csrf.html", status=403)
