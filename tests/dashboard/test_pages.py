"""The UI shell: every page renders for every role, in both languages, with only local assets."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.contrib.staticfiles import finders
from django.test import Client
from django.urls import resolve, reverse

from appliance.roles import Role, allowed
from tests.conftest import make_user

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    "dashboard:overview",
    "models_catalog:list",
    "provisioning:list",
    "gpus:list",
    "tenancy:list",
    "audit",
    "users",
    "tokens",
]


NAV = {"Overview": "dashboard:overview", "Models": "models_catalog:list", "Deployments": "provisioning:list",
       "GPUs": "gpus:list", "Departments": "tenancy:list", "Audit": "audit"}  # fmt: skip


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_for_every_role_it_allows(client: Client, role: Role, page: str) -> None:
    user = make_user("u", role)
    client.force_login(user)
    response = client.get(reverse(page))
    if not allowed(user, resolve(reverse(page)).func.rule):
        assert response.status_code == 403
        return
    assert response.status_code == 200
    html = response.content.decode()
    # The navigation links only to the pages the role may open.
    for label, target in NAV.items():
        assert (f">{label}</a>" in html) == allowed(user, resolve(reverse(target)).func.rule), label
    assert 'aria-current="page"' in html


@pytest.mark.parametrize("page", PAGES)
def test_every_page_in_chinese(admin_client: Client, page: str) -> None:
    admin_client.post(reverse("set_language"), {"language": "zh-hans", "next": "/"})
    html = admin_client.get(reverse(page)).content.decode()
    for label in ("概览", "模型", "部署", "GPU", "部门", "审计"):
        assert f">{label}</a>" in html


def test_language_switch_round_trip(admin_client: Client) -> None:
    response = admin_client.post(reverse("set_language"), {"language": "zh-hans", "next": reverse("audit")})
    assert response.status_code == 302 and response["Location"] == reverse("audit")
    assert "审计" in admin_client.get(reverse("audit")).content.decode()
    admin_client.post(reverse("set_language"), {"language": "en", "next": "/"})
    assert ">Audit</a>" in admin_client.get(reverse("audit")).content.decode()


def test_unknown_language_is_ignored(admin_client: Client) -> None:
    admin_client.post(reverse("set_language"), {"language": "xx-evil", "next": "/"})
    assert ">Overview</a>" in admin_client.get("/").content.decode()


def test_viewer_sees_no_admin_forms(viewer_client: Client) -> None:
    # Users and API tokens are the appliance admins' alone, reading included.
    assert viewer_client.get(reverse("users")).status_code == 403
    assert viewer_client.get(reverse("tokens")).status_code == 403
    html = viewer_client.get(reverse("tenancy:list")).content.decode()
    assert reverse("tenancy:create") not in html


def test_health_panel_polls_itself(admin_client: Client) -> None:
    html = admin_client.get("/").content.decode()
    assert 'hx-get="/overview/health"' in html and 'hx-trigger="every 5s"' in html
    fragment = admin_client.get("/overview/health").content.decode()
    assert "<html" not in fragment and "Database" in fragment


def test_audit_page_filters(admin_client: Client, admin_user: Any) -> None:
    from appliance.audit import record

    record(None, "user.create", actor=admin_user)
    record(None, "api_token.revoke", actor=admin_user)
    record(None, "user.create", outcome="denied")
    html = admin_client.get(reverse("audit"), {"action": "token"}).content.decode()
    assert "api_token.revoke" in html and "user.create" not in html
    html = admin_client.get(reverse("audit"), {"outcome": "denied"}).content.decode()
    assert html.count('<code class="muted">user.create</code>') == 1


def test_audit_filter_errors_next_to_field(admin_client: Client) -> None:
    response = admin_client.get(reverse("audit"), {"since": "2026-05-02", "until": "2026-05-01"})
    assert response.status_code == 200
    assert set(response.context["form"].errors) == {"until"}
    response = admin_client.get(reverse("audit"), {"since": "not-a-date", "page": "999"})
    assert "since" in response.context["form"].errors


def test_static_assets_are_served_by_the_app(client: Client) -> None:
    for asset in (
        "dashboard/vendor/htmx-2.0.11.min.js",
        "dashboard/vendor/chart-4.6.1.umd.min.js",
        "dashboard/console.css",
    ):
        assert finders.find(asset), asset
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200, asset


def test_nothing_loads_from_the_internet() -> None:
    """No template or stylesheet references a remote asset (src, href, url(), @import)."""
    remote = re.compile(
        r"""(src|href)\s*=\s*["']\s*(https?:)?//|url\(\s*["']?(https?:)?//|@import\s+["']?(https?:)?//"""
    )
    checked = 0
    for path in ROOT.glob("*/templates/**/*.html"):
        checked += 1
        assert not remote.search(path.read_text()), path
    for path in ROOT.glob("*/static/**/*.css"):
        checked += 1
        assert not remote.search(path.read_text()), path
    assert checked > 10
