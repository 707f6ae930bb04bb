"""The Overview on a fresh box tells a newcomer what to do next, counts what there is, and names
audit actions in words."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from appliance import audit
from appliance.roles import Role
from provisioning.models import EngineRuntime
from tenancy.models import ApiKey, Department, Membership, UsageRecord
from tests.conftest import make_user

pytestmark = pytest.mark.django_db


def test_a_fresh_box_shows_the_first_steps_until_a_model_is_called(admin_client: Client,
                                                                    deployment_factory: Any) -> None:  # fmt: skip
    fresh = admin_client.get(reverse("dashboard:overview"))
    steps = fresh.context["first_steps"]
    assert len(steps) == 5 and not any(step.done for step in steps)
    assert "Getting started" in fresh.content.decode() and reverse("models_catalog:add") in fresh.content.decode()

    deployment = deployment_factory(name="tiny")  # a ready model, a runtime, a deployment
    EngineRuntime.objects.update(status="ready")
    department = Department.objects.create(name="Legal")
    key, _ = ApiKey.issue(department, "bot")
    done = [step.done for step in admin_client.get(reverse("dashboard:overview")).context["first_steps"]]
    assert done == [True, True, True, True, False]
    UsageRecord.objects.create(stream_id="1-0", created_at=timezone.now(), department=department, api_key=key,
                               deployment=deployment, model="tiny", endpoint="chat/completions",
                               status=200)  # fmt: skip
    served = admin_client.get(reverse("dashboard:overview"))
    assert served.context["first_steps"] == [] and "Getting started" not in served.content.decode()
    assert served.context["counts"]["deployments"]["total"] == 1 and served.context["counts"]["departments"] == 1


def test_department_roles_get_their_own_counts_and_no_steps(client: Client) -> None:
    mine, other = Department.objects.create(name="Legal"), Department.objects.create(name="Sales")
    user = make_user("dora", Role.DEPARTMENT_VIEWER)
    Membership.objects.create(user=user, department=mine, role=Membership.Role.VIEWER)
    client.force_login(user)
    page = client.get(reverse("dashboard:overview"))
    assert page.context["first_steps"] == [] and page.context["counts"]["departments"] == 1
    assert "models" not in page.context["counts"] and other.name not in page.content.decode()


def test_audit_actions_are_named_in_words(admin_client: Client, admin_user: Any) -> None:
    audit.record(None, "api_key.issue", actor=admin_user)
    page = admin_client.get(reverse("dashboard:overview")).content.decode()
    assert "API key issued" in page
    admin_client.post(reverse("set_language"), {"language": "zh-hans", "next": "/"})
    chinese = admin_client.get(reverse("dashboard:overview")).content.decode()
    assert "已签发 API 密钥" in chinese


def test_times_carry_their_time_zone(admin_client: Client, admin_user: Any, settings: Any) -> None:
    audit.record(None, "auth.login", actor=admin_user)
    assert " UTC</td>" in admin_client.get(reverse("audit")).content.decode()
