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
    key = ApiKey.objects.get(name="contracts")
    reveal = reverse("tenancy:reveal", args=[setup["legal"].pk, key.pk])
    assert response.status_code == 302 and response["Location"] == reveal  # post/redirect/get
    shown = setup["dora"].get(reveal)
    assert shown.status_code == 200 and "no-store" in shown["Cache-Control"]
    raw = shown.context["secret"]
    assert ApiKey.authenticate(raw) == key and f"Bearer {raw}" in shown.content.decode()  # the snippets
    # A reload shows the secret no more and issues nothing.
    again = setup["dora"].get(reveal)
    assert again.context["secret"] is None and raw not in again.content.decode()
    assert "was shown once already" in again.content.decode() and ApiKey.objects.count() == 2
    page = setup["dora"].get(reverse("tenancy:detail", args=[setup["legal"].pk])).content.decode()
    assert raw not in page and "contracts" in page
    assert AuditEvent.objects.filter(action="api_key.issue").count() == 1


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
        reverse("tenancy:key-action", args=[sales.pk, key.pk, "rotate"]), {"grace_minutes": 30}, follow=True
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


def test_every_action_says_what_it_did(admin_client: Client, setup: dict) -> None:
    created = admin_client.post(reverse("tenancy:create"), {"name": "Research", "priority": "normal"}, follow=True)
    assert "Department Research created." in created.content.decode()
    research = Department.objects.get(name="Research")
    make_user("erin", Role.DEPARTMENT_VIEWER)
    added = admin_client.post(reverse("tenancy:add-member", args=[research.pk]),
                              {"username": "erin", "role": "viewer"}, follow=True)  # fmt: skip
    assert "erin is now" in added.content.decode() and "of Research." in added.content.decode()
    key, _ = ApiKey.issue(research, "nightly")
    revoked = admin_client.post(reverse("tenancy:key-action", args=[research.pk, key.pk, "revoke"]), follow=True)
    assert "Key nightly revoked: it no longer works." in revoked.content.decode()


@pytest.mark.parametrize("name", ["research", "RESEARCH", " Research ", "Research"])
def test_department_names_differ_by_more_than_case(admin_client: Client, name: str) -> None:
    Department.objects.create(name="Research")
    response = admin_client.post(reverse("tenancy:create"), {"name": name, "priority": "normal"})
    assert response.status_code == 400 and "exists already" in response.content.decode()
    assert Department.objects.count() == 1


def test_a_key_limit_above_the_departments_is_refused(admin_client: Client, setup: dict) -> None:
    legal = setup["legal"]
    Department.objects.filter(pk=legal.pk).update(rpm=60, max_tokens_per_request=1000)
    url = reverse("tenancy:issue-key", args=[legal.pk])
    response = admin_client.post(url, {"name": "wide", "rpm": 600, "max_tokens_per_request": 4000, "tpm": 5})
    assert response.status_code == 400 and not ApiKey.objects.filter(name="wide").exists()
    errors = response.context["key_form"].errors
    assert set(errors) == {"rpm", "max_tokens_per_request"} and "(60)" in errors["rpm"][0]
    assert "(1,000)" in errors["max_tokens_per_request"][0]
    assert admin_client.post(url, {"name": "narrow", "rpm": 30}).status_code == 302


def test_consumption_against_the_quota_and_usable_keys(admin_client: Client, settings: Any) -> None:
    import redis

    from tenancy.limiter import Limiter

    research = Department.objects.create(name="Research", tokens_per_day=500_000, tokens_per_month=9_000_000)
    ApiKey.issue(research, "live")
    ApiKey.issue(research, "old")[0].revoke()
    assert Limiter(redis.Redis.from_url(settings.REDIS_URL)).admit(research.pk, research.limits(), 1234).allowed
    listing = admin_client.get(reverse("tenancy:list"))
    row = next(d for d in listing.context["departments"] if d.pk == research.pk)
    assert (row.used_today, row.usable_keys) == (1234, 1)
    assert "1,234 of 500,000" in listing.content.decode()  # thousands separated
    page = admin_client.get(reverse("tenancy:detail", args=[research.pk])).content.decode()
    assert "1,234 of 500,000" in page and "1,234 of 9,000,000" in page
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # Redis away: unknown, not zero
    assert admin_client.get(reverse("tenancy:list")).status_code == 200
    assert admin_client.get(reverse("tenancy:detail", args=[research.pk])).context["department"].used_today is None


def test_a_keys_own_limits_are_listed(admin_client: Client) -> None:
    research = Department.objects.create(name="Research")
    ApiKey.issue(research, "narrow", rpm=30, max_tokens_per_request=2048)
    page = admin_client.get(reverse("tenancy:detail", args=[research.pk])).content.decode()
    assert "30 requests/min" in page and "2,048 tokens/request" in page


def test_a_member_is_removed_from_the_page(admin_client: Client, setup: dict) -> None:
    legal, dora = setup["legal"], setup["dora"]
    member = Membership.objects.get(department=legal)
    url = reverse("tenancy:remove-member", args=[legal.pk, member.user_id])
    assert dora.post(url).status_code == 403  # a department admin manages keys, not members
    page = admin_client.get(reverse("tenancy:detail", args=[legal.pk])).content.decode()
    assert f'action="{url}"' in page and "data-confirm" in page
    removed = admin_client.post(url, follow=True)
    assert "dora is no longer a member of Legal." in removed.content.decode()
    assert not Membership.objects.filter(department=legal).exists()
    assert AuditEvent.objects.filter(action="department.member_remove").count() == 1
    assert admin_client.post(url).status_code == 404  # gone already
