"""Every page action has an API twin: the page's POST actions (found in the URL conf, see
``tests/appliance/pages.py``) map to management API operations in ``TWINS``, every one of which is in
``/api/v1/openapi.json``; the twins refuse the roles the page's rule refuses, and department roles get
nothing of another department through them. A new page action without a twin fails here."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.test import Client

from appliance.models import AuditEvent
from tests.appliance.pages import console_pages
from tests.appliance.walls import ROLES, World, build_world, expected

pytestmark = pytest.mark.django_db

SOURCE = {"name": "s", "url": "https://s.example.com"}

# Page action ("url name", or "url name:action" for pages with an ``action`` argument) -> (method, path of
# the API twin as /api/v1/openapi.json writes it, a request body the API takes as well-formed).
TWINS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    # Users and API tokens
    "directory-test": ("POST", "/api/v1/directory/test", None),
    "directory-oidc-test": ("POST", "/api/v1/directory/oidc/test", None),
    "user-create": ("POST", "/api/v1/users", {"username": "newbie", "role": "viewer"}),
    "user-set-role": ("POST", "/api/v1/users/{user_id}/role", {"role": "viewer"}),
    "user-toggle-active": ("POST", "/api/v1/users/{user_id}/active", {"active": False}),
    "token-create": ("POST", "/api/v1/tokens", {"name": "another"}),
    "token-revoke": ("POST", "/api/v1/tokens/{token_id}/revoke", None),
    # Models and their sources
    "models_catalog:download": ("POST", "/api/v1/models", {"repo_id": "acme/other"}),
    "models_catalog:import": ("POST", "/api/v1/models/import", {"directory": "/nonexistent", "repo_id": "acme/x"}),
    "models_catalog:endpoint-create": ("POST", "/api/v1/sources", SOURCE),
    "models_catalog:endpoint-update": ("PUT", "/api/v1/sources/{source_id}", SOURCE),
    "models_catalog:endpoint-delete": ("DELETE", "/api/v1/sources/{source_id}", None),
    "models_catalog:job-cancel": ("POST", "/api/v1/model-jobs/{job_id}/cancel", None),
    "models_catalog:act:update": ("POST", "/api/v1/models/{model_id}/update", None),
    "models_catalog:act:verify": ("POST", "/api/v1/models/{model_id}/verify", None),
    "models_catalog:act:resume": ("POST", "/api/v1/models/{model_id}/resume", None),
    "models_catalog:act:check": ("POST", "/api/v1/models/{model_id}/check", None),
    "models_catalog:act:delete": ("DELETE", "/api/v1/models/{model_id}", None),
    "models_catalog:act:allow-remote-code": ("POST", "/api/v1/models/{model_id}/remote-code", {"allow": True}),
    # Deployments and engine runtimes
    "provisioning:deploy": ("POST", "/api/v1/deployments", {"model_id": 0, "name": "another"}),
    "provisioning:install-runtime": ("POST", "/api/v1/runtimes/install", None),
    "provisioning:act:stop": ("POST", "/api/v1/deployments/{deployment_id}/stop", None),
    "provisioning:act:start": ("POST", "/api/v1/deployments/{deployment_id}/start", None),
    "provisioning:act:restart": ("POST", "/api/v1/deployments/{deployment_id}/restart", None),
    "provisioning:act:scale": ("POST", "/api/v1/deployments/{deployment_id}/scale", {"replicas": 0}),
    "provisioning:act:delete": ("DELETE", "/api/v1/deployments/{deployment_id}", None),
    "provisioning:act:targets": ("PUT", "/api/v1/deployments/{deployment_id}/targets", {"target_ttft_p99_ms": 500}),
    "provisioning:act:acknowledge": ("POST", "/api/v1/deployments/{deployment_id}/target-alerts/acknowledge", None),
    # GPUs
    "gpus:alert-ack": ("POST", "/api/v1/alerts/{alert_id}/acknowledge", None),
    "gpus:webhook-create": ("POST", "/api/v1/webhooks", {"name": "w", "url": "https://w.example.com"}),
    "gpus:webhook-delete": ("DELETE", "/api/v1/webhooks/{webhook_id}", None),
    # Departments, members, keys, prices
    "tenancy:create": ("POST", "/api/v1/departments", {"name": "Another"}),
    "tenancy:update": ("PATCH", "/api/v1/departments/{department_id}", {"rpm": 5}),
    "tenancy:delete": ("DELETE", "/api/v1/departments/{department_id}", None),
    "tenancy:add-member": ("POST", "/api/v1/departments/{department_id}/members", {"username": "walls-viewer"}),
    "tenancy:remove-member": ("DELETE", "/api/v1/departments/{department_id}/members/{user_id}", None),
    "tenancy:issue-key": ("POST", "/api/v1/departments/{department_id}/keys", {"name": "another"}),
    "tenancy:key-action:revoke": ("POST", "/api/v1/departments/{department_id}/keys/{key_id}/revoke", None),
    "tenancy:key-action:rotate": ("POST", "/api/v1/departments/{department_id}/keys/{key_id}/rotate", {}),
    "tenancy:key-action:delete": ("DELETE", "/api/v1/departments/{department_id}/keys/{key_id}", None),
    "tenancy:set-price": ("POST", "/api/v1/prices", {"model": "dep-alpha"}),
    "tenancy:delete-price": ("DELETE", "/api/v1/prices/{price_id}", None),
    # Nodes
    "nodes:join-token": ("POST", "/api/v1/nodes/join-tokens", None),
    "nodes:act:drain": ("POST", "/api/v1/nodes/{node_id}/drain", {"draining": True}),
    "nodes:act:resume": ("POST", "/api/v1/nodes/{node_id}/drain", {"draining": False}),
    "nodes:act:forget": ("DELETE", "/api/v1/nodes/{node_id}", None),
}


# Page actions whose twin is not in the management API, and why.
NO_TWIN = {
    "gateway:playground-chat": "the playground's chat is the /v1 gateway's chat/completions with a department's key",
}


def page_actions() -> dict[str, str]:
    """Every page action of the URL conf -> the rule the page asks for it."""
    actions = {}
    for page in console_pages():
        if not page.is_action:
            continue
        if page.per_action:
            actions.update({f"{page.name}:{action}": rule for action, rule in page.per_action.items()})
        else:
            actions[page.name] = page.rule
    return actions


def test_every_page_action_has_an_api_twin() -> None:
    actions = page_actions()
    assert len(actions) > 30, "the URL conf walk found too few page actions"
    missing = sorted(set(actions) - set(TWINS) - set(NO_TWIN))
    assert missing == [], "page actions without an API twin: add the endpoint and its TWINS entry"
    stale = sorted(set(TWINS) - set(actions))
    assert stale == [], "TWINS entries for page actions that no longer exist"


def test_every_twin_is_in_the_openapi_schema(client: Client) -> None:
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    absent = [f"{name}: {method} {path}" for name, (method, path, _body) in TWINS.items()
              if method.lower() not in paths.get(path, {})]  # fmt: skip
    assert absent == []


def test_api_objects_are_named_by_id_everywhere(client: Client) -> None:
    """One way to refer to each object: every path parameter is an integer id."""
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for name in re.findall(r"{(\w+)}", path):
            assert name == "id" or name.endswith("_id"), path
            for operation in operations.values():
                for parameter in operation.get("parameters", []):
                    if parameter["name"] == name and parameter["in"] == "path":
                        assert parameter["schema"]["type"] == "integer", (path, name)


def _fill(path: str, side: str, world: World) -> str:
    values = world.ids(side) | {
        "deployment_id": (world.dep_b if side == "B" else world.dep_a).pk,
        "source_id": world.endpoint.pk,
    }
    return re.sub(r"{(\w+)}", lambda match: str(values[match[1]]), path)


def call(client: Client, method: str, path: str, body: Any, token: str) -> Any:
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    if method == "GET":
        return client.get(path, **auth)
    return client.generic(method, path, "" if body is None else json.dumps(body),
                          content_type="application/json", **auth)  # fmt: skip


@pytest.mark.parametrize("role", list(ROLES))
def test_twins_refuse_whom_the_page_refuses(role: str, client: Client) -> None:
    """For every page action a role may not do (or may do, but not to department B's objects), its
    API twin refuses too (403, or 404 for what the role may not know of), and writes the refusal."""
    world = build_world()
    user, actions = world.users[role], page_actions()
    refused = 0
    for name, (method, path, body) in TWINS.items():
        if name == "provisioning:deploy":
            body = {**body, "model_id": world.model.pk}
        sides = ("A", "B") if re.search(r"{(department_id|key_id|deployment_id)}", path) else (None,)
        for side in sides:
            if expected(user, actions[name], side, world) == "ok":
                continue
            response = call(client, method, _fill(path, side or "A", world), body, world.tokens[role])
            assert response.status_code in (403, 404), f"{role} {name} ({side}): {response.status_code}"
            refused += 1
    if role != "admin":
        assert refused > 0
        assert AuditEvent.objects.filter(actor=user, outcome="denied").exists()


# --- twins added for page actions that had none -------------------------------------------------------


def test_resume_twin_fetches_a_failed_model_again(client: Client) -> None:
    from models_catalog.models import LocalModel, ModelJob

    world = build_world()
    model = world.model
    LocalModel.objects.filter(pk=model.pk).update(status=LocalModel.Status.FAILED, error="source gone")
    path = f"/api/v1/models/{model.pk}/resume"
    assert call(client, "POST", path, None, world.tokens["viewer"]).status_code == 403
    response = call(client, "POST", path, None, world.tokens["operator"])
    assert response.status_code == 202, response.content
    job = ModelJob.objects.get(pk=response.json()["id"])
    assert (job.model, job.kind, response.json()["kind"]) == (model, ModelJob.Kind.DOWNLOAD, "download")
    model.refresh_from_db()
    assert model.status == LocalModel.Status.DOWNLOADING and model.endpoint == world.endpoint
    assert AuditEvent.objects.filter(action="model.resume", target_id=str(model.pk), detail__via="api").exists()
    # A model that is not failed has nothing to resume: a conflict, as on the page.
    assert call(client, "POST", path, None, world.tokens["operator"]).status_code == 409
    assert call(client, "POST", "/api/v1/models/999999/resume", None, world.tokens["admin"]).status_code == 404


def test_api_delete_of_a_deployment_archives_it_when_usage_refers_to_it(client: Client) -> None:
    """As the page does (``Deployment.remove``): a deployment the bills name is archived, not deleted."""
    from django.utils import timezone

    from provisioning.models import Deployment
    from tenancy.models import DeploymentHours

    world = build_world()
    token = world.tokens["operator"]
    DeploymentHours.objects.create(deployment=world.dep_a, start=timezone.now(), replica_seconds=60, gpu_seconds=60)
    Deployment.objects.filter(pk=world.dep_b.pk).update(desired=Deployment.Desired.RUNNING)

    busy = call(client, "DELETE", f"/api/v1/deployments/{world.dep_b.pk}", None, token)
    assert busy.status_code == 409 and Deployment.objects.filter(pk=world.dep_b.pk).exists()

    assert call(client, "DELETE", f"/api/v1/deployments/{world.dep_a.pk}", None, token).status_code == 204
    archived = Deployment.all_objects.get(pk=world.dep_a.pk)
    assert archived.archived_at is not None and not Deployment.objects.filter(pk=world.dep_a.pk).exists()
    assert not world.dept_a.deployments.exists()  # out of the department's list, as the page leaves it
    event = AuditEvent.objects.get(action="deployment.delete", target_id=str(world.dep_a.pk))
    assert event.detail == {"outcome": "archived", "via": "api"}

    Deployment.objects.filter(pk=world.dep_b.pk).update(desired=Deployment.Desired.STOPPED)
    assert call(client, "DELETE", f"/api/v1/deployments/{world.dep_b.pk}", None, token).status_code == 204
    assert not Deployment.all_objects.filter(pk=world.dep_b.pk).exists()  # nothing referred to it: gone
    event = AuditEvent.objects.get(action="deployment.delete", target_id=str(world.dep_b.pk))
    assert event.detail["outcome"] == "deleted"
