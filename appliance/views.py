"""Project-wide pages: health, audit log, users and API tokens, and the error pages."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth import views as auth_views
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from appliance import audit, directory, health, oidc
from appliance.env import department_target
from appliance.forms import AuditFilterForm, RoleForm, TokenCreateForm, UserCreateForm
from appliance.models import ApiToken, AuditEvent, Profile
from appliance.roles import Role, requires, role_of


@require_GET
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    state = health.report()
    state["backup"].pop("error", None)  # unauthenticated: whether and when, not why
    return JsonResponse(state, status=200 if state["ok"] else 503)


@require_GET
@requires("audit.view")
def audit_log(request: HttpRequest) -> HttpResponse:
    form = AuditFilterForm(request.GET or None)
    visible = AuditEvent.objects.visible_to(request.user)
    events = form.apply(visible) if request.GET else visible
    page = Paginator(events, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "appliance/audit.html",
        {"form": form, "page": page, "query": query.urlencode(), "nav": "audit"},
    )


def _role_names(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Group → role mappings with each role's name as people read it (the setting holds its value)."""
    return [(group, str(Role(role).label)) for group, role in pairs]


def _membership_names(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Group → "Department:admin|viewer" mappings as "Department — Department admin|Viewer"."""
    from tenancy.models import Membership

    names = {"admin": Membership.Role.ADMIN.label, "viewer": Membership.Role.VIEWER.label}
    shown = []
    for group, target in pairs:
        department, level = department_target(target)
        shown.append((group, f"{department} — {names[level]}"))
    return shown


@require_GET
@requires("directory.view")
def directory_settings(request: HttpRequest) -> HttpResponse:
    """Directory sign-in as configured (read-only, secrets masked), with its group mappings: LDAP and
    OpenID Connect."""
    context = {"enabled": directory.enabled(), "shown": directory.shown_settings(),
               "role_groups": _role_names(settings.LDAP_ROLE_GROUPS),
               "department_groups": _membership_names(settings.LDAP_DEPARTMENT_GROUPS),
               "oidc_enabled": oidc.enabled(), "oidc_shown": oidc.shown_settings(),
               "oidc_callback": oidc.callback_url(request),
               "oidc_role_groups": _role_names(settings.OIDC_ROLE_GROUPS),
               "oidc_department_groups": _membership_names(settings.OIDC_DEPARTMENT_GROUPS),
               "nav": "settings"}  # fmt: skip
    return render(request, "appliance/directory.html", context)


def _connection_tested(request: HttpRequest, action: str, result: dict[str, Any]) -> HttpResponse:
    audit.record(request, action, outcome="ok" if result["ok"] else "failed", detail=result)
    say = messages.success if result["ok"] else messages.error
    say(request, f"{result['message']} ({result.get('seconds', 0)} s)")
    return redirect("directory")


@require_POST
@requires("directory.view")
def directory_test(request: HttpRequest) -> HttpResponse:
    return _connection_tested(request, "directory.test", directory.test_connection())


@require_POST
@requires("directory.view")
def oidc_test(request: HttpRequest) -> HttpResponse:
    return _connection_tested(request, "directory.oidc_test", oidc.test_connection())


class LoginView(auth_views.LoginView):
    """Django's sign-in page, with the "Sign in with …" button when OpenID Connect is on."""

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context.update(oidc_enabled=oidc.enabled(), oidc_label=settings.OIDC_BUTTON_LABEL)
        return context


def _safe_next(request: HttpRequest, url: str) -> str:
    allowed = url_has_allowed_host_and_scheme(url, {request.get_host()}, require_https=request.is_secure())
    return url if url and allowed else ""


def _oidc_step(request: HttpRequest, step: Callable[[], str]) -> HttpResponse:
    """Redirect to where ``step`` says, or back to the sign-in page saying why not."""
    if not oidc.enabled():
        messages.error(request, _("OpenID Connect sign-in is off."))
        return redirect("login")
    try:
        return redirect(step())
    except oidc.SignInError as error:
        oidc.failed(request, error)
        messages.error(request, error.message)
        return redirect("login")


@require_GET
@never_cache
def oidc_login(request: HttpRequest) -> HttpResponse:
    """The "Sign in with …" button: off to the identity provider (OpenID Connect, authorization code with PKCE)."""
    return _oidc_step(request, lambda: oidc.start(request, _safe_next(request, request.GET.get("next", ""))))


@require_GET
@never_cache
def oidc_callback(request: HttpRequest) -> HttpResponse:
    """Where the identity provider sends the browser back: signed in, or the sign-in page saying why not."""
    return _oidc_step(request, lambda: _safe_next(request, oidc.finish(request)) or settings.LOGIN_REDIRECT_URL)


@require_GET
@requires("user.view")
def user_list(request: HttpRequest) -> HttpResponse:
    return _users_page(request, UserCreateForm())


USERS_PAGE_SIZE = 50


def _users_page(request: HttpRequest, form: UserCreateForm, status: int = 200) -> HttpResponse:
    """Users, 50 a page, searchable by name or email, each with their role and memberships."""
    query = request.GET.get("q", "").strip()[:150]
    users = get_user_model().objects.select_related("profile").prefetch_related("memberships__department")
    if query:
        users = users.filter(Q(username__icontains=query) | Q(email__icontains=query))
    page = Paginator(users.order_by("username"), USERS_PAGE_SIZE).get_page(request.GET.get("page"))
    for person in page:
        role = role_of(person)
        person.role_label = role.label if role else _("Deactivated")
    context = {"users": page, "query": query, "page_query": urlencode({"q": query}) if query else "",
               "form": form, "nav": "settings"}  # fmt: skip
    return render(request, "appliance/users.html", context, status=status)


@require_POST
@requires("user.manage")
def user_create(request: HttpRequest) -> HttpResponse:
    form = UserCreateForm(request.POST)
    if not form.is_valid():
        return _users_page(request, form, status=400)
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
@requires("user.manage")
def user_set_role(request: HttpRequest, user_id: int) -> HttpResponse:
    user = get_object_or_404(get_user_model(), pk=user_id)
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("Unknown role."))
        return redirect("users")
    if user == request.user:
        messages.error(request, _("You cannot change your own role."))
        return redirect("users")
    if form.cleaned_data["role"] != Role.APPLIANCE_ADMIN and Profile.is_last_admin(user):
        messages.error(request, _("%(user)s is the last appliance admin.") % {"user": user.username})
        return redirect("users")
    Profile.set_role(user, form.cleaned_data["role"])
    audit.record(request, "user.set_role", user, detail={"role": form.cleaned_data["role"]})
    messages.success(request, _("Role of %(user)s changed.") % {"user": user.username})
    return redirect("users")


@require_POST
@requires("user.manage")
def user_toggle_active(request: HttpRequest, user_id: int) -> HttpResponse:
    user = get_object_or_404(get_user_model(), pk=user_id)
    if user == request.user:
        messages.error(request, _("You cannot deactivate yourself."))
        return redirect("users")
    if user.is_active and Profile.is_last_admin(user):
        messages.error(request, _("%(user)s is the last appliance admin.") % {"user": user.username})
        return redirect("users")
    user.is_active = not user.is_active
    user.save(update_fields=["is_active"])
    audit.record(request, "user.activate" if user.is_active else "user.deactivate", user)
    return redirect("users")


TOKEN_HEADER = "Authorization: Bearer <token>"  # noqa: S105 (a placeholder, shown escaped, as code)


@require_GET
@requires("api_token.view")
def token_list(request: HttpRequest) -> HttpResponse:
    tokens = ApiToken.objects.filter(user=request.user)
    return render(request, "appliance/tokens.html", {"tokens": tokens, "form": TokenCreateForm(), "nav": "settings",
                                                     "header": TOKEN_HEADER})  # fmt: skip


@require_POST
@requires("api_token.manage")
@never_cache
def token_create(request: HttpRequest) -> HttpResponse:
    form = TokenCreateForm(request.POST)
    if not form.is_valid():
        tokens = ApiToken.objects.filter(user=request.user)
        return render(request, "appliance/tokens.html", {"tokens": tokens, "form": form, "nav": "settings",
                                                         "header": TOKEN_HEADER}, status=400)  # fmt: skip
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
@requires("api_token.manage")
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


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition of the GPUs, the engines, the deployments' targets and the gateway;
    needs ``Authorization: Bearer <METRICS_TOKEN>``."""
    from gateway import metrics as gateway_metrics
    from gpus.metrics import GpuCollector
    from provisioning.metrics import EngineCollector

    if not settings.METRICS_TOKEN:
        return HttpResponse("Metrics are off: set METRICS_TOKEN.\n", status=403, content_type="text/plain")
    sent = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(sent.encode(), settings.METRICS_TOKEN.encode()):
        return HttpResponse("A valid metrics token is required.\n", status=401, content_type="text/plain")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuCollector())
    registry.register(EngineCollector())
    body = generate_latest(registry) + generate_latest(gateway_metrics.REGISTRY)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
