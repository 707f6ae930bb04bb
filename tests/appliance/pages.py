"""The console's pages as the URL conf declares them, for the tests that must cover every page:
the role × URL matrix (``test_role_matrix``) and the page action → API twin table (``test_api_twins``).
A page added to any console app is picked up here without anyone listing it."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from django.urls import URLPattern, URLResolver, get_resolver

# The console's own apps; other URL patterns (Django's, django-ninja's) are someone else's.
CONSOLE_MODULES = ("appliance.", "dashboard.", "tenancy.", "provisioning.", "models_catalog.", "gpus.", "nodes.",
                   "gateway.", "tests.jobapp.")  # fmt: skip

# Not pages of the console, so no role rule: what signs in and out, the machines' endpoints and the API
# (whose endpoints ask the same rules themselves: tests/appliance/test_api_fuzz.py).
NOT_PAGES = {
    "healthz": "liveness probe for the process manager, no session",
    "metrics": "Prometheus scrape endpoint, its own token",
    "login": "signing in",
    "oidc-login": "signing in (OpenID Connect: off to the identity provider)",
    "oidc-callback": "signing in (OpenID Connect: back from the identity provider)",
    "logout": "signing out",
    "password-change": "any signed-in user changes their own password",
    "hf-mirror": "hub-compatible mirror for engines and peer appliances, its own key check",
}
NOT_PAGE_PREFIXES = ("admin/", "static/", "i18n/", "api/")

# Pages any signed-in user may open whatever their role, so they carry no rule on purpose. Keep this
# short and say why for each; every other page must be guarded by ``appliance.roles.requires``.
OPEN_PAGES: dict[str, str] = {}

HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


@dataclass(frozen=True)
class Page:
    name: str  # "namespace:name", as reverse() wants it
    route: str  # the full pattern, for messages
    view: Callable[..., Any]
    kwargs: tuple[str, ...]  # the URL arguments

    @property
    def rule(self) -> str | None:
        return getattr(self.view, "rule", None)

    @property
    def per_action(self) -> dict[str, str]:
        return dict(getattr(self.view, "per_action", {}) or {})

    @property
    def methods(self) -> set[str]:
        """The methods the view answers: what ``require_http_methods`` (``require_GET``/``_POST``)
        lets through, or, for a view without it, GET plus POST when its code branches on a POST."""
        for wrapper in _unwrapped(self.view):
            for cell in getattr(wrapper, "__closure__", None) or ():
                value = cell.cell_contents
                if isinstance(value, list | tuple) and value and set(value) <= HTTP_METHODS:
                    return set(value)
        source = inspect.getsource(inspect.unwrap(self.view))
        return {"GET", "POST"} if 'request.method == "POST"' in source else {"GET"}

    @property
    def is_page(self) -> bool:
        return "GET" in self.methods

    @property
    def is_action(self) -> bool:
        return "POST" in self.methods

    def rule_for(self, action: str | None) -> str | None:
        return self.per_action[action] if action else self.rule


def _unwrapped(view: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    while view is not None:
        yield view
        view = getattr(view, "__wrapped__", None)


def _walk(patterns: list[Any], prefix: str = "", namespace: str = "") -> Iterator[tuple[str, str, URLPattern]]:
    for entry in patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            inner = f"{namespace}{entry.namespace}:" if entry.namespace else namespace
            yield from _walk(entry.url_patterns, route, inner)
        else:
            yield route, namespace, entry


def console_pages(urlpatterns: list[Any] | None = None) -> list[Page]:
    """Every page and page action of the console's own apps in the URL conf (or in ``urlpatterns``)."""
    pages = []
    for route, namespace, pattern in _walk(get_resolver().url_patterns if urlpatterns is None else urlpatterns):
        view = pattern.callback
        module = getattr(inspect.unwrap(view), "__module__", "") + "."
        if not module.startswith(CONSOLE_MODULES) or route.startswith(NOT_PAGE_PREFIXES):
            continue
        if pattern.name in NOT_PAGES:
            continue
        kwargs = tuple(pattern.pattern.regex.groupindex)
        pages.append(Page(f"{namespace}{pattern.name}", route, view, kwargs))
    return pages


def pages_without_rule(pages: list[Page]) -> list[str]:
    return [f"{page.name} ({page.route})" for page in pages if page.rule is None and page.name not in OPEN_PAGES]
