"""The management API fuzzed from its own schema (schemathesis over ``/api/v1/openapi.json``), as each
role: no operation answers 5xx to anything the schema allows, and no answer to a department role
mentions the other department (its names, or its objects' ids in the fields that name them).

Bounded so that it stays a unit test: a few examples per operation and role, no deadline, no example
database. Each role gets a fresh world (one test per role), so what an appliance admin's fuzzing
changes (memberships, roles) cannot widen what a department role sees."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python import wsgi

from appliance.roles import DEPARTMENT_ROLES, role_of
from tests.appliance.walls import DEPARTMENT_ROLE_NAMES, ROLES, SECRET, World, build_world

pytestmark = pytest.mark.django_db

EXAMPLES = int(os.environ.get("API_FUZZ_EXAMPLES", "8"))  # per operation and role
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no replays from earlier runs: each run is as long as the last
    derandomize=True,  # the same examples on every run (API_FUZZ_EXAMPLES=100 to look further)
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure shows its first example
    suppress_health_check=list(HealthCheck),
)


@contextmanager
def wsgi_in_the_test_transaction() -> Any:
    """Django's WSGI handler closes the database connection after a request; inside a test that would
    throw the test's transaction away. The test client does the same as this around its requests."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield get_wsgi_application()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def leaks(payload: Any, world: World) -> list[str]:
    """Where an answer names department B's objects by id (names are looked for in the text)."""
    found = []
    b_ids = {"department_id": world.dept_b.pk, "key_id": world.key_b.pk, "deployment_id": world.dep_b.pk}
    if isinstance(payload, dict):
        for name, value in payload.items():
            if name in b_ids and value == b_ids[name]:
                found.append(f"{name}={value}")
            if name == "deployment_ids" and isinstance(value, list) and world.dep_b.pk in value:
                found.append(f"deployment_ids has {world.dep_b.pk}")
            found += leaks(value, world)
    elif isinstance(payload, list):
        for item in payload:
            found += leaks(item, world)
    return found


@pytest.mark.parametrize("role", list(ROLES))
def test_api_fuzzed_as_each_role(role: str, settings: Any) -> None:
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, wsgi.HOST]
    world = build_world()
    user, headers = world.users[role], {"Authorization": f"Bearer {world.tokens[role]}"}
    department_role = role in DEPARTMENT_ROLE_NAMES
    failures: list[str] = []
    statuses: dict[int, int] = {}
    with wsgi_in_the_test_transaction() as app:
        schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) > 40

        for operation in operations:

            @FUZZ_SETTINGS
            @given(case=_strategy(operation), side=st.sampled_from(["random", "A", "B"]))
            def fuzz(case: Any, side: str) -> None:
                _aim(case, side, world, role)
                response = case.call(headers=headers)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                what = f"{role} {case.method} {case.formatted_path} -> {response.status_code}"
                if response.status_code >= 500:
                    failures.append(f"{what}\n    {case.as_curl_command(headers=headers)}\n    {response.text[:500]}")
                    return
                if department_role and role_of(_fresh(user)) in DEPARTMENT_ROLES:
                    if SECRET in response.text.lower():
                        failures.append(f"{what}: mentions department B\n    {response.text[:500]}")
                    elif found := leaks(_json(response.text), world):
                        failures.append(f"{what}: names department B's objects: {found}")

            fuzz()
    assert failures == [], "\n".join(failures[:20])
    assert sum(statuses.values()) >= len(operations), statuses


def _strategy(operation: Any) -> Any:
    """Input the schema allows, and input it does not (which must be a 4xx, never a 5xx)."""
    return operation.as_strategy() | operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)


def _aim(case: Any, side: str, world: World, role: str) -> None:
    """Random ids mostly name nothing: point the path at department A's or B's real objects instead."""
    if side == "random" or not case.path_parameters:
        return
    b = side == "B"
    real = {
        "department_id": (world.dept_b if b else world.dept_a).pk,
        "key_id": (world.key_b if b else world.key_a).pk,
        "deployment_id": (world.dep_b if b else world.dep_a).pk,
        "user_id": (world.bravo_member if b else world.users["dept_viewer"]).pk,
        "model_id": world.model.pk,
        "job_id": world.job.pk,
        "source_id": world.endpoint.pk,
        "alert_id": world.alert.pk,
        "webhook_id": world.webhook.pk,
        "token_id": spare_token(world).pk,  # never the caller's own: revoked, the rest of the run is 401s
    }
    for name in list(case.path_parameters):
        if name in real:
            case.path_parameters[name] = real[name]


def spare_token(world: World) -> Any:
    from appliance.models import ApiToken

    if "spare_token" not in world.objects:
        world.objects["spare_token"] = ApiToken.issue(world.users["admin"], "spare")[0]
    return world.objects["spare_token"]


def _fresh(user: Any) -> Any:
    from django.contrib.auth import get_user_model

    return get_user_model().objects.select_related("profile").get(pk=user.pk)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def test_department_roles_get_nothing_of_department_b_by_id(client: Any) -> None:
    """Beyond what the fuzzer happens to pick: every API read that takes an id, given B's, as a
    department role of A is refused (and A's, for comparison, is answered)."""
    world = build_world()
    reads = {
        "/api/v1/departments/{dept}": 200,
        "/api/v1/departments/{dept}/members": 200,
        "/api/v1/departments/{dept}/keys": 200,
        "/api/v1/departments/{dept}/keys/{key}": 200,
        "/api/v1/deployments/{dep}": 200,
    }
    for role in DEPARTMENT_ROLE_NAMES:
        auth = {"HTTP_AUTHORIZATION": f"Bearer {world.tokens[role]}"}
        for template, ok in reads.items():
            for side, dept, key, dep in (("A", world.dept_a, world.key_a, world.dep_a),
                                         ("B", world.dept_b, world.key_b, world.dep_b)):  # fmt: skip
                path = template.format(dept=dept.pk, key=key.pk, dep=dep.pk)
                response = client.get(path, **auth)
                if side == "A":
                    assert response.status_code == ok, (role, path, response.status_code)
                else:
                    assert response.status_code in (403, 404), (role, path, response.status_code)
                    assert SECRET not in response.content.decode().lower()
        listed = {
            path: client.get(path, **auth).content.decode().lower()
            for path in ("/api/v1/departments", "/api/v1/deployments", "/api/v1/prices", "/api/v1/audit-events")
        }
        for path, body in listed.items():
            assert SECRET not in body, (role, path)
        assert "alpha office" in listed["/api/v1/departments"] and "dep-alpha" in listed["/api/v1/deployments"]


def test_what_the_fuzzer_found_stays_fixed(client: Any) -> None:
    """An offset larger than the database's integers was a 500: now a 422 (the schema bounds it)."""
    world = build_world()
    auth = {"HTTP_AUTHORIZATION": f"Bearer {world.tokens['admin']}"}
    assert client.get("/api/v1/audit-events", {"offset": 10**30}, **auth).status_code == 422
    assert client.get("/api/v1/audit-events", {"offset": 10**9}, **auth).json() == []
