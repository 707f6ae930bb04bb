"""Role × URL matrix, generated from the URL conf: every page of the console carries a rule of
``appliance.roles`` and answers each role as ``roles.can`` says, and a department role never reaches
another department's objects (404 on their pages, their names on none of its pages).

The pages come from ``tests/appliance/pages.py`` (the URL conf walked), so a new page is in the matrix
without anyone adding it, and a new page without a rule fails ``test_every_page_has_a_rule``."""

from __future__ import annotations

from typing import Any

import pytest
from django.http import HttpResponse
from django.test import Client
from django.urls import path, reverse

from appliance.roles import DEPARTMENT_ROLES, role_of
from tests.appliance.pages import console_pages, pages_without_rule
from tests.appliance.walls import PAGE_QUERIES, ROLES, SECRET, World, build_world, expected, page_variants

pytestmark = pytest.mark.django_db


@pytest.fixture
def world() -> World:
    return build_world()


def test_every_page_has_a_rule() -> None:
    pages = console_pages()
    assert len(pages) > 30, "the URL conf walk found too few pages"
    assert pages_without_rule(pages) == [], "guard these pages with appliance.roles.requires (or list them in "
    "OPEN_PAGES, saying why)"


def test_a_page_without_a_rule_is_caught() -> None:
    """The walk itself: an unguarded view in a console app is reported, a guarded one is not."""
    from appliance.roles import requires

    def unguarded(request: Any) -> HttpResponse:
        return HttpResponse("hello")

    unguarded.__module__ = "tenancy.views"
    guarded = requires("department.view")(unguarded)
    conf = [path("open/", unguarded, name="open"), path("guarded/", guarded, name="guarded")]
    reported = pages_without_rule(console_pages(conf))
    assert reported == ["open (open/)"]


def _body(response: Any) -> str:
    content = b"".join(response.streaming_content) if response.streaming else response.content
    return content.decode(errors="replace")


def _login_url() -> str:
    return reverse("login")


def _check(response: Any, wanted: str, what: str) -> None:
    status = response.status_code
    if wanted == "ok":
        location = response.get("Location", "")
        redirect_ok = status in (301, 302, 303) and not location.startswith(_login_url())
        assert status == 200 or redirect_ok, f"{what}: expected 200, got {status} {location}"
    else:
        assert status in (403, 404), f"{what}: expected 403/404, got {status}"


# --- the matrix -------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(ROLES))
def test_pages_answer_each_role_as_the_table_says(role: str, world: World) -> None:
    user = world.users[role]
    client = Client()
    client.force_login(user)
    checked = 0
    for page in console_pages():
        if not page.is_page:
            continue
        for side, action, kwargs in page_variants(page, world):
            response = client.get(reverse(page.name, kwargs=kwargs), PAGE_QUERIES.get(page.name, {}))
            wanted = expected(user, page.rule_for(action), side, world)
            _check(response, wanted, f"{role} GET {page.name} {kwargs}")
            checked += 1
            if role_of(user) in DEPARTMENT_ROLES and response.status_code == 200:
                body = _body(response).lower()
                assert SECRET not in body, f"{role} sees department B on {page.name} {kwargs}"
    assert checked > 20


@pytest.mark.parametrize("role", list(ROLES))
def test_page_actions_refuse_roles_the_table_refuses(role: str, world: World) -> None:
    """POST every page action a role may not do (or may do, but to department B's objects): refused,
    and nothing changed. What a role may do is each app's own tests' business."""
    from provisioning.models import Deployment
    from tenancy.models import ApiKey, Department

    user = world.users[role]
    client = Client()
    client.force_login(user)
    before = _snapshot()
    refused = 0
    for page in console_pages():
        if not page.is_action:
            continue
        for side, action, kwargs in page_variants(page, world):
            if expected(user, page.rule_for(action), side, world) == "ok":
                continue
            response = client.post(reverse(page.name, kwargs=kwargs), {"name": "x", "allow": "1", "replicas": "0"})
            _check(response, "denied", f"{role} POST {page.name} {kwargs}")
            refused += 1
    assert _snapshot() == before
    assert Department.objects.filter(pk=world.dept_b.pk).active().exists()
    assert ApiKey.objects.get(pk=world.key_b.pk).revoked_at is None
    assert Deployment.objects.filter(pk=world.dep_b.pk).exists()
    if role != "admin":
        assert refused > 0


def _snapshot() -> dict[str, Any]:
    from django.contrib.auth import get_user_model

    from gpus.models import Alert, Webhook
    from models_catalog.models import HubEndpoint, LocalModel, ModelJob
    from provisioning.models import Deployment
    from tenancy.models import ApiKey, Department, Membership, ModelPrice

    return {
        "users": sorted(get_user_model().objects.values_list("username", "is_active", "profile__role")),
        "departments": sorted(Department.objects.values_list("pk", "name", "archived_at", "rpm")),
        "members": sorted(Membership.objects.values_list("user_id", "department_id", "role")),
        "keys": sorted(ApiKey.objects.values_list("pk", "revoked_at", "archived_at")),
        "deployments": sorted(Deployment.all_objects.values_list("pk", "desired", "replicas", "archived_at")),
        "models": sorted(LocalModel.all_objects.values_list("pk", "status", "allow_remote_code")),
        "jobs": ModelJob.objects.count(),
        "endpoints": sorted(HubEndpoint.objects.values_list("pk", "name", "url")),
        "alerts": sorted(Alert.objects.values_list("pk", "acknowledged_at")),
        "webhooks": sorted(Webhook.objects.values_list("pk", "url")),
        "prices": sorted((m, str(p)) for m, p in ModelPrice.objects.values_list("model", "prompt_per_million")),
    }


def test_anonymous_visitors_are_sent_to_sign_in(client: Client, world: World) -> None:
    for page in console_pages():
        for _side, _action, kwargs in page_variants(page, world):
            method = client.get if page.is_page else client.post
            response = method(reverse(page.name, kwargs=kwargs))
            assert response.status_code == 302, f"anonymous {page.name}: {response.status_code}"
            assert response["Location"].startswith(_login_url()), page.name


def test_department_roles_see_department_a_and_global_roles_see_b(world: World) -> None:
    """The matrix's "bravo is nowhere" means something: the same pages do show B to global roles."""
    pages = ["tenancy:list", "provisioning:list", "tenancy:usage", "tenancy:chargeback", "audit"]
    for role in ROLES:
        client = Client()
        client.force_login(world.users[role])
        for name in pages:
            body = client.get(reverse(name)).content.decode().lower()
            if role in ("admin", "operator", "viewer"):
                assert SECRET in body, f"{role} should see department B on {name}"
            else:
                assert SECRET not in body, f"{role} sees department B on {name}"
        if role in ("dept_admin", "dept_viewer"):
            assert "alpha office" in client.get(reverse("tenancy:list")).content.decode().lower()
            assert "dep-alpha" in client.get(reverse("provisioning:list")).content.decode()
