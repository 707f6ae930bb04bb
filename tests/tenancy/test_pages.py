"""Departments pages: two departments, a department admin of A cannot see or touch B's keys."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from appliance.models import AuditEvent
from appliance.roles import Role
from tenancy.models import ApiKey, Department, Membership
from tests.conftest import make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def setup() -> dict[str, Any]:
    legal, sales = Department.objects.create(name="Legal"), Department.objects.create(name="Sales")
    dora = make_user("dora", Role.DEPARTMENT_ADMIN)
    Membership.objects.create(user=dora, department=legal, role=Membership.Role.ADMIN)
    sales_key, _ = ApiKey.issue(sales, "sales bot")
    client = Client()
    client.force_login(dora)
    return {"legal": legal, "sales": sales, "sales_key": sales_key, "dora": client}


def test_admin_creates_department_with_quotas(admin_client: Client) -> None:
    response = admin_client.post(reverse("tenancy:create"), {"name": "R&D", "priority": "high", "rpm": 120})
    assert response.status_code == 302
    assert Department.objects.get().rpm == 120
    bad = admin_client.post(reverse("tenancy:create"), {"name": "Ops", "priority": "urgent", "rpm": -5})
    assert bad.status_code == 400 and set(bad.context["form"].errors) == {"priority", "rpm"}


def test_department_admin_issues_a_key_shown_once(setup: dict) -> None:
    response = setup["dora"].post(reverse("tenancy:issue-key", args=[setup["legal"].pk]), {"name": "contracts"})
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    raw = response.context["secret"]
    assert ApiKey.authenticate(raw).department == setup["legal"]
    page = setup["dora"].get(reverse("tenancy:detail", args=[setup["legal"].pk])).content.decode()
    assert raw not in page and "contracts" in page
    assert AuditEvent.objects.filter(action="api_key.issue").exists()


def test_department_admin_cannot_reach_another_department(setup: dict) -> None:
    dora, sales, key = setup["dora"], setup["sales"], setup["sales_key"]
    assert "Sales" not in dora.get(reverse("tenancy:list")).content.decode()
    assert dora.get(reverse("tenancy:detail", args=[sales.pk])).status_code == 404
    assert dora.post(reverse("tenancy:issue-key", args=[sales.pk]), {"name": "x"}).status_code == 404
    for action in ("revoke", "rotate"):
        url = reverse("tenancy:key-action", args=[sales.pk, key.pk, action])
        assert dora.post(url, {"grace_minutes": 5}).status_code == 404
        # guessing B's key id under A's department does not work either
        url = reverse("tenancy:key-action", args=[setup["legal"].pk, key.pk, action])
        assert dora.post(url, {"grace_minutes": 5}).status_code == 404
    key.refresh_from_db()
    assert key.is_usable and key.replaced_by is None


def test_rotate_and_revoke_from_the_page(admin_client: Client, setup: dict) -> None:
    sales, key = setup["sales"], setup["sales_key"]
    response = admin_client.post(
        reverse("tenancy:key-action", args=[sales.pk, key.pk, "rotate"]), {"grace_minutes": 30}
    )
    new_raw = response.context["secret"]
    key.refresh_from_db()
    assert key.is_usable and key.grace_until is not None  # old one still works for 30 minutes
    new = ApiKey.authenticate(new_raw)
    admin_client.post(reverse("tenancy:key-action", args=[sales.pk, new.pk, "revoke"]))
    assert ApiKey.authenticate(new_raw) is None


def test_department_admin_cannot_change_quotas(setup: dict) -> None:
    response = setup["dora"].post(reverse("tenancy:update", args=[setup["legal"].pk]), {"name": "Legal", "rpm": 1})
    assert response.status_code == 403
    assert Department.objects.get(name="Legal").rpm is None


def test_viewer_reads_but_cannot_issue(viewer_client: Client, setup: dict) -> None:
    assert viewer_client.get(reverse("tenancy:detail", args=[setup["sales"].pk])).status_code == 200
    response = viewer_client.post(reverse("tenancy:issue-key", args=[setup["sales"].pk]), {"name": "x"})
    assert response.status_code == 403 and ApiKey.objects.count() == 1
