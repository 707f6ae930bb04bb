"""The Usage and Chargeback pages' figures through the management API, scoped the same way: a
department role reads its own departments only; bad dates, months and department ids get 422."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tenancy.models import SetAsideUsage
from tests.appliance.walls import build_world

pytestmark = pytest.mark.django_db


@pytest.fixture
def world() -> Any:
    return build_world()


def get(world: Any, role: str, path: str, **params: Any) -> Any:
    return Client().get(path, params, HTTP_AUTHORIZATION=f"Bearer {world.tokens[role]}")


def test_usage_as_each_role(world: Any) -> None:
    everything = get(world, "admin", "/api/v1/usage").json()
    assert {row["label"] for row in everything["rows"]} == {world.dept_a.name, world.dept_b.name}
    assert everything["total"]["tokens"] == 2 * 360 and everything["total"]["requests"] == 6
    for role in ("dept_admin", "dept_viewer"):
        own = get(world, role, "/api/v1/usage", group="model")
        assert own.status_code == 200 and "bravo" not in own.text
        assert [row["label"] for row in own.json()["rows"]] == ["dep-alpha"] and own.json()["total"]["tokens"] == 360
        # Naming department B is refused like an unknown id, not answered with nothing.
        assert get(world, role, "/api/v1/usage", department=world.dept_b.pk).status_code == 422
    by_key = get(world, "viewer", "/api/v1/usage", group="key", department=world.dept_a.pk).json()
    assert len(by_key["rows"]) == 1 and "alpha key" in by_key["rows"][0]["label"]


@pytest.mark.parametrize(
    "params",
    [{"start": "2026-13-01"}, {"start": "yesterday"}, {"start": "2026-05-02", "end": "2026-05-01"},
     {"group": "colour"}, {"department": "999999"}, {"department": "x"}, {"start": "1999-12-31"}],
    ids=["bad-month", "words", "backwards", "bad-group", "unknown-department", "not-an-id", "too-early"],
)  # fmt: skip
def test_usage_bad_filters_get_422(world: Any, params: dict) -> None:
    response = get(world, "admin", "/api/v1/usage", **params)
    assert response.status_code == 422 and response.json()["detail"], response.content


def test_chargeback_as_each_role(world: Any) -> None:
    everything = get(world, "admin", "/api/v1/chargeback").json()
    assert everything["currency"] == "USD"
    assert {d["department"] for d in everything["departments"]} == {world.dept_a.name, world.dept_b.name}
    own = get(world, "dept_viewer", "/api/v1/chargeback")
    assert own.status_code == 200 and "bravo" not in own.text
    (charge,) = own.json()["departments"]
    assert charge["department_id"] == world.dept_a.pk and charge["lines"][0]["model"] == "dep-alpha"
    assert charge["lines"][0]["priced"] and charge["lines"][0]["prompt_tokens"] == 300
    for month in ("2026-13", "last month", "26-01"):
        assert get(world, "admin", "/api/v1/chargeback", month=month).status_code == 422


def test_set_aside_entries_for_admins_only(world: Any) -> None:
    SetAsideUsage.objects.create(stream_id="9-0", reason="unreadable entry: ValueError: lots", fields="{}")
    listed = get(world, "admin", "/api/v1/usage/set-aside")
    assert listed.status_code == 200 and listed.json()[0]["reason"] == "unreadable entry: ValueError: lots"
    for role in ("operator", "viewer", "dept_admin", "dept_viewer"):
        assert get(world, role, "/api/v1/usage/set-aside").status_code == 403
    assert get(world, "admin", "/api/v1/usage/set-aside", offset=-1).status_code == 422
