"""Bills are history. Deleting a department, a key, a deployment and a model that past usage refers
to archives them: the usage page, its CSV, chargeback and its CSV for that month read byte for byte
the same afterwards (and after the deployment's name is reused); archived objects leave the lists,
pickers and the gateway. What nothing refers to is really deleted. A key allows every deployment of
its department (a flag) or exactly its list, which may be empty and then allows nothing."""

from __future__ import annotations

import importlib
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from django.apps import apps
from django.conf import settings
from django.test import Client
from django.urls import reverse

from appliance.archiving import ARCHIVED, DELETED
from appliance.jobs import run_job
from appliance.models import AuditEvent
from gateway import directory
from models_catalog.models import JobConflict, LocalModel, ModelJob
from models_catalog.tasks import model_job_body
from provisioning.models import Deployment, DeploymentBusy, Replica
from tenancy import usage
from tenancy.models import ApiKey, Department, DeploymentHours, ModelPrice, UsageRecord, UsageRollup
from tests.tenancy.test_api import Api

pytestmark = pytest.mark.django_db

MONTH = "2025-03"
BILLS = {
    "usage by department": "/departments/usage/?start=2025-03-01&end=2025-03-31&group=department",
    "usage by key": "/departments/usage/?start=2025-03-01&end=2025-03-31&group=key",
    "usage by model": "/departments/usage/?start=2025-03-01&end=2025-03-31&group=model",
    "usage, two days, hourly": "/departments/usage/?start=2025-03-03&end=2025-03-04&group=key",
    "usage CSV": "/departments/usage.csv?start=2025-03-01&end=2025-03-31",
    "chargeback": f"/departments/chargeback/?month={MONTH}",
    "chargeback CSV": f"/departments/chargeback.csv?month={MONTH}",
}
# The only bytes of a page that differ between two renders: the CSRF token is masked anew each time.
CSRF = re.compile(rb'(csrfmiddlewaretoken" value="|"X-CSRFToken": ")[A-Za-z0-9]+')


@pytest.fixture
def no_connection_recycling(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's loaders recycle stale connections; inside a test's transaction they must not."""
    monkeypatch.setattr(directory, "close_old_connections", lambda: None)


@pytest.fixture
def world(settings: Any, tmp_path: Path, admin_user: Any, deployment_factory: Any) -> dict[str, Any]:
    settings.DATA_DIR = tmp_path / "data"
    chat = deployment_factory("chat", desired=Deployment.Desired.STOPPED)
    embed = deployment_factory("embed", desired=Deployment.Desired.STOPPED)
    legal, sales = Department.objects.create(name="Legal"), Department.objects.create(name="Sales")
    legal.deployments.set([chat, embed])
    sales.deployments.set([chat])
    legal_key, legal_raw = ApiKey.issue(legal, "contracts bot")
    sales_key, _ = ApiKey.issue(sales, "crm bot")
    return {"chat": chat, "embed": embed, "legal": legal, "sales": sales, "legal_key": legal_key,
            "legal_raw": legal_raw, "sales_key": sales_key, "api": Api(admin_user)}  # fmt: skip


def _send(client: redis.Redis, key: ApiKey, deployment: Deployment, at: datetime, n: int = 1, **extra: Any) -> None:
    for i in range(n):
        fields = {"department_id": key.department_id, "key_id": key.pk, "deployment_id": deployment.pk,
                  "model": deployment.name, "endpoint": "chat/completions", "prompt_tokens": 1000 + i,
                  "completion_tokens": 333, "latency_ms": 51.5, "ttft_ms": 9.25,
                  "at": at.timestamp()} | extra  # fmt: skip
        usage.publish(client, usage.entry(**fields))


def _march(redis_db: redis.Redis, world: dict) -> None:
    """A month of two departments on a shared deployment, with its GPU-hours and prices."""
    chat, embed = world["chat"], world["embed"]
    _send(redis_db, world["legal_key"], chat, datetime(2025, 3, 3, 9, 15, tzinfo=UTC), n=3)
    _send(redis_db, world["legal_key"], embed, datetime(2025, 3, 4, 23, 59, tzinfo=UTC), completion_tokens=0)
    _send(redis_db, world["legal_key"], chat, datetime(2025, 3, 20, tzinfo=UTC), status=500, error="upstream")
    _send(redis_db, world["sales_key"], chat, datetime(2025, 3, 4, 1, 0, tzinfo=UTC), n=2)
    assert usage.drain(redis_db) == 7
    DeploymentHours.objects.create(deployment=chat, start=datetime(2025, 3, 3, 9, tzinfo=UTC), replica_seconds=3600,
                                   gpu_seconds=7200)  # fmt: skip
    DeploymentHours.objects.create(deployment=embed, start=datetime(2025, 3, 9, 9, tzinfo=UTC), replica_seconds=1800,
                                   gpu_seconds=1800)  # fmt: skip
    ModelPrice.objects.create(model="chat", prompt_per_million=Decimal("2.5"), completion_per_million=Decimal(10),
                              gpu_hour=Decimal("3.3"))  # fmt: skip
    ModelPrice.objects.create(model="embed", prompt_per_million=Decimal("0.1"), gpu_hour=Decimal(1))


def _bills(client: Client) -> dict[str, bytes]:
    out = {}
    for name, url in BILLS.items():
        response = client.get(url)
        assert response.status_code == 200, name
        body = b"".join(response.streaming_content) if response.streaming else response.content
        out[name] = CSRF.sub(rb"\1-", body)
    return out


def _delete_everything(admin_client: Client, world: dict) -> None:
    """The deployment and its model on their pages, the key and the department through the API."""
    chat, legal = world["chat"], world["legal"]
    # Followed, so that the pages' messages are shown (and not shown again on the bills).
    response = admin_client.post(reverse("provisioning:act", args=["chat", "delete"]), follow=True)
    assert response.redirect_chain == [(reverse("provisioning:list"), 302)]
    assert "kept, archived, for the bills; the name is free again" in response.content.decode()
    response = admin_client.post(reverse("models_catalog:act", args=[chat.model_id, "delete"]), follow=True)
    assert response.status_code == 200
    job = ModelJob.objects.get(model_id=chat.model_id, kind=ModelJob.Kind.DELETE)
    run_job(ModelJob, job.pk, model_job_body)
    api = world["api"]
    assert api("DELETE", f"/api/v1/departments/{legal.pk}/keys/{world['legal_key'].pk}").status_code == 204
    assert api("DELETE", f"/api/v1/departments/{legal.pk}").status_code == 204


def test_past_bills_read_the_same_after_deleting_department_key_deployment_and_model(
    redis_db: redis.Redis, world: dict, admin_client: Client, no_connection_recycling: None
) -> None:
    _march(redis_db, world)
    before = _bills(admin_client)
    assert b"Legal" in before["chargeback"] and b"contracts bot" in before["usage by key"]
    assert before["usage CSV"].count(b"\n") == 1 + 4  # a header, then Legal chat x2, Legal embed, Sales chat
    rows = (UsageRecord.objects.count(), UsageRollup.objects.count(), DeploymentHours.objects.count())

    _delete_everything(admin_client, world)

    chat, legal, key = world["chat"], world["legal"], world["legal_key"]
    assert Deployment.all_objects.get(pk=chat.pk).archived_at is not None
    assert LocalModel.all_objects.get(pk=chat.model_id).archived_at is not None
    assert ApiKey.objects.get(pk=key.pk).archived_at is not None
    assert Department.objects.get(pk=legal.pk).archived_at is not None
    assert (UsageRecord.objects.count(), UsageRollup.objects.count(), DeploymentHours.objects.count()) == rows
    after = _bills(admin_client)
    for name in BILLS:
        assert after[name] == before[name], name

    # The served model name is free again; a new deployment of it changes nothing in March's bills.
    world["chat"] = new_chat = Deployment.objects.create(
        name="chat", model=LocalModel.objects.create(repo_id="acme/chat", node=settings.NODE_NAME, status="ready"),
        runtime=chat.runtime, node=chat.node,
    )  # fmt: skip
    assert _bills(admin_client) == before
    assert directory._load_routes()["chat"].deployment_id == new_chat.pk

    outcomes = dict(AuditEvent.objects.filter(action__endswith=".delete").values_list("action", "detail__outcome"))
    # The model's page only starts its job: the outcome is the job's, later, on the worker.
    deleted = {"deployment.delete": ARCHIVED, "api_key.delete": ARCHIVED, "department.delete": ARCHIVED}
    assert outcomes == deleted | {"model.delete": None}


def test_archived_objects_leave_lists_pickers_and_the_gateway(
    redis_db: redis.Redis, world: dict, admin_client: Client, no_connection_recycling: None
) -> None:
    _march(redis_db, world)
    chat, legal, sales = world["chat"], world["legal"], world["sales"]
    assert directory._load_key(world["sales_key"].key_id).models == frozenset({"chat"})
    _delete_everything(admin_client, world)

    api = world["api"]
    assert [d["name"] for d in api("GET", "/api/v1/departments").json()] == ["Sales"]
    assert api("GET", f"/api/v1/departments/{legal.pk}").status_code == 404
    assert admin_client.get(reverse("tenancy:detail", args=[legal.pk])).status_code == 404
    assert b"Legal" not in admin_client.get(reverse("tenancy:list")).content
    assert ApiKey.authenticate(world["legal_raw"]) is None
    assert directory._load_key(world["legal_key"].key_id) is None

    assert not Deployment.objects.filter(name="chat").exists()
    assert not Replica.objects.filter(deployment_id=chat.pk).exists()
    assert admin_client.get(reverse("provisioning:detail", args=["chat"])).status_code == 404
    assert b"acme/chat" not in admin_client.get(reverse("models_catalog:list")).content
    # Out of every list: Sales' key (all of its department's deployments) now reaches none.
    assert list(sales.deployments.all()) == [] and world["sales_key"].allowed_deployment_ids() == set()
    assert directory._load_key(world["sales_key"].key_id).models == frozenset()
    page = admin_client.get(reverse("tenancy:detail", args=[sales.pk])).content.decode()
    assert f'value="{chat.pk}"' not in page  # not offered in the department's or the key form's pickers
    refused = api("PATCH", f"/api/v1/departments/{sales.pk}", {"deployment_ids": [chat.pk]})
    assert refused.status_code == 400
    assert (
        refused.json()["detail"]
        == f"deployment_ids: These deployments were deleted and cannot be chosen: chat (id {chat.pk})."
    )


def test_what_nothing_refers_to_is_really_deleted(
    world: dict, admin_client: Client, deployment_factory: Any, no_connection_recycling: None
) -> None:
    spare = deployment_factory("spare", desired=Deployment.Desired.STOPPED)
    temp = Department.objects.create(name="Temp")
    temp.deployments.set([spare])
    key, _ = ApiKey.issue(temp, "unused")
    assert admin_client.post(reverse("provisioning:act", args=["spare", "delete"])).status_code == 302
    assert not Deployment.all_objects.filter(pk=spare.pk).exists()
    admin_client.post(reverse("models_catalog:act", args=[spare.model_id, "delete"]))
    run_job(ModelJob, ModelJob.objects.get(model_id=spare.model_id).pk, model_job_body)
    assert not LocalModel.all_objects.filter(pk=spare.model_id).exists()
    page_delete = admin_client.post(reverse("tenancy:key-action", args=[temp.pk, key.pk, "delete"]))
    assert page_delete.status_code == 302 and not ApiKey.objects.filter(pk=key.pk).exists()
    assert admin_client.post(reverse("tenancy:delete", args=[temp.pk])).status_code == 302
    assert not Department.objects.filter(pk=temp.pk).exists()
    assert AuditEvent.objects.get(action="department.delete").detail["outcome"] == DELETED
    assert AuditEvent.objects.get(action="api_key.delete").target_id == str(key.pk)


def test_a_used_key_deleted_on_the_page_is_archived_and_leaves_the_list(
    redis_db: redis.Redis, world: dict, admin_client: Client
) -> None:
    _march(redis_db, world)
    legal, key = world["legal"], world["legal_key"]
    response = admin_client.post(reverse("tenancy:key-action", args=[legal.pk, key.pk, "delete"]), follow=True)
    assert "kept, archived, for the bills" in response.content.decode()
    assert "contracts bot" not in response.content.decode().split('id="keys"')[1].split("</table>")[0]
    key.refresh_from_db()
    assert key.archived_at is not None and not key.is_usable
    assert world["api"]("GET", f"/api/v1/departments/{legal.pk}/keys/{key.pk}").status_code == 404
    assert key.pk not in [k["id"] for k in world["api"]("GET", f"/api/v1/departments/{legal.pk}/keys").json()]


def test_an_archived_department_keeps_its_name(redis_db: redis.Redis, world: dict, admin_client: Client) -> None:
    _march(redis_db, world)
    legal = world["legal"]
    assert legal.remove() == ARCHIVED
    response = admin_client.post(reverse("tenancy:create"), {"name": "Legal", "priority": "normal"})
    assert response.status_code == 400 and "A deleted department had this name" in response.content.decode()
    refused = world["api"]("POST", "/api/v1/departments", {"name": "Legal"})
    assert refused.status_code == 422 and "past bills" in refused.json()["detail"]
    assert Department.objects.filter(name="Legal").count() == 1


def test_deleting_what_runs_is_refused(world: dict, admin_client: Client) -> None:
    chat = world["chat"]
    Deployment.objects.filter(pk=chat.pk).update(desired=Deployment.Desired.RUNNING)
    chat.refresh_from_db()
    response = admin_client.post(reverse("provisioning:act", args=["chat", "delete"]), follow=True)
    assert "Stop the deployment" in response.content.decode()
    with pytest.raises(DeploymentBusy):
        chat.remove()
    Deployment.objects.filter(pk=chat.pk).update(desired=Deployment.Desired.STOPPED)
    Replica.objects.create(deployment=chat, ordinal=0, node=settings.NODE_NAME, state=Replica.State.STOPPING)
    chat.refresh_from_db()
    with pytest.raises(DeploymentBusy):
        chat.remove()
    assert Deployment.objects.filter(pk=chat.pk, archived_at__isnull=True).exists()
    # A model stays while a deployment not deleted uses it, stopped or running.
    with pytest.raises(JobConflict, match="deployment chat"):
        LocalModel.objects.get(pk=chat.model_id).request_delete()


# A key's deployments: all of its department's, or exactly its list


def test_all_deployments_or_exactly_the_list(
    world: dict, deployment_factory: Any, no_connection_recycling: None
) -> None:
    chat, embed, legal = world["chat"], world["embed"], world["legal"]
    everything = world["legal_key"]
    assert everything.all_deployments and everything.allowed_deployment_ids() == {chat.pk, embed.pk}
    listed, _ = ApiKey.issue(legal, "chat only", all_deployments=False, deployments=[chat])
    assert listed.allowed_deployment_ids() == {chat.pk}
    empty, _ = ApiKey.issue(legal, "nothing", all_deployments=False)
    assert empty.allowed_deployment_ids() == set()
    assert directory._load_key(empty.key_id).models == frozenset()
    # The department gets a new deployment: the flag follows, the list does not.
    later = deployment_factory("later")
    legal.deployments.add(later)
    assert everything.allowed_deployment_ids() == {chat.pk, embed.pk, later.pk}
    assert listed.allowed_deployment_ids() == {chat.pk}
    # The list's last deployment deleted (nothing refers to it): the key allows nothing, not everything.
    assert chat.remove() == DELETED
    assert listed.allowed_deployment_ids() == set()
    assert directory._load_key(listed.key_id).models == frozenset()
    new, _ = listed.rotate(timedelta(0))
    assert not new.all_deployments and new.allowed_deployment_ids() == set()


def test_archiving_the_last_listed_deployment_allows_nothing(redis_db: redis.Redis, world: dict) -> None:
    _march(redis_db, world)
    listed, _ = ApiKey.issue(world["legal"], "chat only", all_deployments=False, deployments=[world["chat"]])
    assert world["chat"].remove() == ARCHIVED
    assert list(listed.deployments.all()) == [] and listed.allowed_deployment_ids() == set()
    assert world["legal_key"].allowed_deployment_ids() == {world["embed"].pk}


def test_the_migration_gives_the_flag_to_keys_without_a_list(world: dict) -> None:
    migration = importlib.import_module("tenancy.migrations.0004_bills_are_history")
    without, _ = ApiKey.issue(world["legal"], "old, no list", all_deployments=False)
    with_list, _ = ApiKey.issue(world["legal"], "old, a list", all_deployments=False, deployments=[world["chat"]])
    migration.all_deployments_for_keys_without_a_list(apps, None)
    without.refresh_from_db()
    with_list.refresh_from_db()
    assert without.all_deployments and not with_list.all_deployments


def test_the_key_form_shows_and_sets_the_flag(world: dict, admin_client: Client) -> None:
    legal, chat, embed = world["legal"], world["chat"], world["embed"]
    url = reverse("tenancy:issue-key", args=[legal.pk])
    page = admin_client.get(reverse("tenancy:detail", args=[legal.pk])).content.decode()
    assert re.search(r"<input type=\"checkbox\" name=\"all_deployments\"[^>]* checked>", page)
    assert "None chosen: the key can use no deployment at all." in page
    assert "all of the department&#x27;s" in page  # the key list tells what each key may use

    both = admin_client.post(url, {"name": "k", "all_deployments": "on", "deployments": [chat.pk]})
    assert both.status_code == 400 and "Choose deployments only with" in both.content.decode()
    other = Deployment.objects.create(name="elsewhere", model=chat.model, runtime=chat.runtime, node=chat.node)
    widening = admin_client.post(url, {"name": "k", "deployments": [other.pk]})  # not one of Legal's
    assert widening.status_code == 400 and not ApiKey.objects.filter(name="k").exists()

    assert admin_client.post(url, {"name": "listed", "deployments": [embed.pk]}).status_code == 302
    listed = ApiKey.objects.get(name="listed")
    assert not listed.all_deployments and listed.allowed_deployment_ids() == {embed.pk}
    assert admin_client.post(url, {"name": "none"}).status_code == 302  # allowed; the help says what it means
    assert ApiKey.objects.get(name="none").allowed_deployment_ids() == set()
    page = admin_client.get(reverse("tenancy:detail", args=[legal.pk])).content.decode()
    assert "none: the key can use no deployment" in page


def test_the_api_sets_the_flag_and_refuses_deleted_deployments(redis_db: redis.Redis, world: dict) -> None:
    api, legal, chat, embed = world["api"], world["legal"], world["chat"], world["embed"]
    url = f"/api/v1/departments/{legal.pk}/keys"
    implied = api("POST", url, {"name": "all"}).json()
    assert implied["all_deployments"] is True and implied["deployment_ids"] == []
    listed = api("POST", url, {"name": "list", "deployment_ids": [embed.pk]}).json()
    assert listed["all_deployments"] is False and listed["deployment_ids"] == [embed.pk]
    nothing = api("POST", url, {"name": "nothing", "all_deployments": False})
    assert nothing.status_code == 201 and ApiKey.objects.get(pk=nothing.json()["id"]).allowed_deployment_ids() == set()
    both = api("POST", url, {"name": "both", "all_deployments": True, "deployment_ids": [embed.pk]})
    assert both.status_code == 422 and "deployment_ids" in both.json()["detail"]
    assert api("POST", url, {"name": "x", "all_deployments": "yes"}).status_code == 422  # not coerced

    _march(redis_db, world)
    assert chat.remove() == ARCHIVED
    refused = api("POST", url, {"name": "archived", "all_deployments": False, "deployment_ids": [chat.pk, embed.pk]})
    assert refused.status_code == 400
    assert refused.json()["detail"] == (
        f"deployment_ids: These deployments were deleted and cannot be chosen: chat (id {chat.pk})."
    )
    assert not ApiKey.objects.filter(name__in=["both", "x", "archived"]).exists()
