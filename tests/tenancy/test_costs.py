"""The cost view: a month of a GPU deployment (GPU-hours, busy share from its engines' minutes, tokens,
cost at the chargeback prices, per million tokens, prefix-cache tokens and their saving), a CPU one
(replica-hours), an idle one with its suggestion; the CSV says the same; a bad month is an error next
to its field; department roles do not see it."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from provisioning.models import Deployment, EngineSample, Replica
from tenancy.costs import cost_view
from tenancy.models import ApiKey, Department, DeploymentHours, ModelPrice, UsageRollup

pytestmark = pytest.mark.django_db


@pytest.fixture
def month_of(deployment_factory: Any, settings: Any) -> dict[str, Any]:
    now = timezone.now()
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    chat = deployment_factory(name="chat")
    cpu = deployment_factory(name="cpu-chat")
    quiet = deployment_factory(name="quiet")
    stopped = deployment_factory(name="stopped", desired=Deployment.Desired.STOPPED)
    Deployment.objects.filter(pk__in=[chat.pk, cpu.pk, quiet.pk, stopped.pk]).update(
        created_at=now - timedelta(days=30)
    )
    legal = Department.objects.create(name="Legal")
    key, _ = ApiKey.issue(legal, "bot")
    UsageRollup.objects.create(period="day", start=first, department=legal, api_key=key, model="chat", requests=10,
                               prompt_tokens=600_000, completion_tokens=400_000)  # fmt: skip
    UsageRollup.objects.create(period="day", start=first, department=legal, api_key=key, model="cpu-chat",
                               requests=1, prompt_tokens=1_000, completion_tokens=1_000)  # fmt: skip
    ModelPrice.objects.create(model="chat", prompt_per_million=Decimal(1), completion_per_million=Decimal(2),
                              gpu_hour=Decimal(3))  # fmt: skip
    DeploymentHours.objects.create(deployment=chat, start=first, replica_seconds=3600, gpu_seconds=7200)
    DeploymentHours.objects.create(deployment=cpu, start=first, replica_seconds=5400, gpu_seconds=0)
    replica = Replica.objects.create(deployment=chat, ordinal=0, node=settings.NODE_NAME, state="ready")
    for minute, running in enumerate((2, 1, 0, 3)):
        EngineSample.objects.create(deployment=chat, replica=replica, resolution="minute", running=running,
                                    time=first + timedelta(minutes=minute), prefix_hit_rate=0.5)  # fmt: skip
    return {"first": first}


def test_a_month_of_each_kind_of_deployment(admin_user: Any, month_of: dict) -> None:
    view = cost_view(admin_user, month_of["first"].date())
    rows = {row.name: row for row in view.deployments}
    chat = rows["chat"]
    assert (chat.gpu_hours, chat.busy_share, chat.tokens) == (2.0, 0.75, 1_000_000)
    assert chat.busy_hours == 1.5 and chat.tokens_per_hour == 500_000
    assert chat.cost == Decimal("7.40")  # 0.60 + 0.80 for tokens, 2 GPU-hours × 3.00
    assert chat.per_million == Decimal("7.40")
    assert (chat.cached_prompt_tokens, chat.cached_saving) == (300_000, Decimal("0.30"))
    assert chat.idle_days is None
    cpu = rows["cpu-chat"]
    assert (cpu.gpu_hours, cpu.replica_hours, cpu.hours, cpu.busy_share) == (0, 1.5, 1.5, None)
    assert cpu.cost == Decimal("0.00") and cpu.per_million is None  # no prices for it
    assert rows["quiet"].idle_days == 30 and rows["stopped"].idle_days is None
    assert [(d.name, d.tokens, d.cost) for d in view.departments] == [("Legal", 1_002_000, Decimal("7.40"))]


def test_the_page_and_the_csv(admin_client: Any, month_of: dict) -> None:
    month = f"{month_of['first']:%Y-%m}"
    page = admin_client.get(reverse("tenancy:costs"), {"month": month}).content.decode()
    assert 'data-testid="costs"' in page and "idle 30 days: consider scaling down" in page and "7.40" in page
    assert "CPU: 1.5 replica-hours" in page and "75 %" in page
    response = admin_client.get(reverse("tenancy:costs-csv"), {"month": month})
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    chat = next(row for row in rows if row["deployment"] == "chat")
    assert (chat["gpu_hours"], chat["busy_share"], chat["cost"], chat["cost_per_million_tokens"]) == (
        "2.000", "0.750", "7.40", "7.40")  # fmt: skip
    assert next(row for row in rows if row["deployment"] == "quiet")["idle_days"] == "30"
    bad = admin_client.get(reverse("tenancy:costs"), {"month": "2026-13"})
    assert bad.status_code == 400 and 'role="alert"' in bad.content.decode()
    assert admin_client.get(reverse("tenancy:costs-csv"), {"month": "nope"}).status_code == 400


def test_department_roles_do_not_see_it(client: Any, dept_admin_user: Any, viewer_user: Any) -> None:
    client.force_login(dept_admin_user)
    assert client.get(reverse("tenancy:costs")).status_code == 403
    client.force_login(viewer_user)
    assert client.get(reverse("tenancy:costs")).status_code == 200
