"""Departments, members and keys through the management API: the happy paths with a bearer token,
two departments kept apart (a department admin of Legal gets 404 for everything of Sales), the
roles' refusals audited, bad input refused with the field named and nothing written, and a key's
secret shown in the issue/rotate responses only."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from appliance.models import ApiToken, AuditEvent
from appliance.roles import Role
from tenancy.models import ApiKey, Department, Membership
from tests.conftest import make_user

pytestmark = pytest.mark.django_db

BASE = "/api/v1/departments"


class Api:
    """A test client that sends JSON with one user's bearer token."""

    def __init__(self, user: Any) -> None:
        _, raw = ApiToken.issue(user, "tests")
        self.client = Client()
        self.auth = {"HTTP_AUTHORIZATION": f"Bearer {raw}"}

    def __call__(self, method: str, path: str, body: Any = None) -> Any:
        data = "" if body is None else json.dumps(body)
        return self.client.generic(method, path, data, content_type="application/json", **self.auth)

    def get(self, path: str) -> Any:
        return self("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self("POST", path, {} if body is None else body)


@pytest.fixture
def world(admin_user: Any, viewer_user: Any, deployment_factory: Any) -> dict[str, Any]:
    chat, embed, other = deployment_factory("chat"), deployment_factory("embed"), deployment_factory("other")
    legal = Department.objects.create(name="Legal", rpm=100)
    legal.deployments.set([chat, embed])
    sales = Department.objects.create(name="Sales", tpm=5000)
    sales.deployments.set([other])
    dora, sam = make_user("dora", Role.DEPARTMENT_ADMIN), make_user("sam", Role.DEPARTMENT_ADMIN)
    Membership.objects.create(user=dora, department=legal, role=Membership.Role.ADMIN)
    Membership.objects.create(user=sam, department=sales, role=Membership.Role.ADMIN)
    sales_key, sales_raw = ApiKey.issue(sales, "sales bot")
    return {
        "legal": legal, "sales": sales, "chat": chat, "embed": embed, "other": other,
        "sales_key": sales_key, "sales_raw": sales_raw,
        "admin": Api(admin_user), "dora": Api(dora), "viewer": Api(viewer_user),
    }  # fmt: skip


def detail_text(response: Any) -> str:
    return json.dumps(response.json()["detail"])


def test_no_token_is_401(client: Client, world: dict) -> None:
    assert client.get(BASE).status_code == 401
    assert client.post(BASE, {"name": "x"}, content_type="application/json").status_code == 401
    assert not Department.objects.filter(name="x").exists()


def test_openapi_describes_the_department_endpoints(client: Client) -> None:
    paths = set(client.get("/api/v1/openapi.json").json()["paths"])
    assert {BASE, f"{BASE}/{{department_id}}/keys", f"{BASE}/{{department_id}}/keys/{{key_id}}/rotate"} <= paths


def test_admin_creates_reads_changes_and_deletes_a_department(world: dict) -> None:
    admin, chat = world["admin"], world["chat"]
    body = {"name": "R&D", "contact": "rd@example.com", "priority": "high", "rpm": 120, "tokens_per_day": 10**9,
            "deployment_ids": [chat.pk]}  # fmt: skip
    created = admin.post(BASE, body)
    assert created.status_code == 201, created.content
    department = created.json()
    assert department["priority"] == "high" and department["rpm"] == 120 and department["tpm"] is None
    assert department["deployment_ids"] == [chat.pk]
    event = AuditEvent.objects.get(action="department.create")
    assert event.detail["quotas"]["tokens_per_day"] == 10**9 and event.detail["via"] == "api"

    url = f"{BASE}/{department['id']}"
    assert admin.get(url).json()["name"] == "R&D"
    assert {d["name"] for d in admin.get(BASE).json()} == {"Legal", "Sales", "R&D"}

    patched = admin("PATCH", url, {"rpm": None, "tpm": 20_000, "deployment_ids": []})
    assert patched.status_code == 200, patched.content
    assert patched.json()["rpm"] is None and patched.json()["tpm"] == 20_000 and patched.json()["deployment_ids"] == []
    row = Department.objects.get(name="R&D")
    assert (row.rpm, row.tpm, row.tokens_per_day, row.contact) == (None, 20_000, 10**9, "rd@example.com")  # rest kept
    assert AuditEvent.objects.get(action="department.update").detail["changed"] == {
        "rpm": None, "tpm": 20_000, "deployments": []
    }  # fmt: skip

    assert admin("DELETE", url).status_code == 204
    assert not Department.objects.filter(name="R&D").exists()
    assert admin.get(url).status_code == 404
    assert AuditEvent.objects.filter(action="department.delete", outcome="ok").count() == 1


def test_unicode_names_are_kept(world: dict) -> None:
    name = "Forschung & Entwicklung – 研究開発 ✓"
    response = world["admin"].post(BASE, {"name": name, "contact": "Zoë Ångström"})
    assert response.status_code == 201
    assert Department.objects.get(pk=response.json()["id"]).name == name


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rpm": -5}, "rpm"),
        ({"rpm": 0}, "rpm"),  # the limiter would read 0 as unlimited; empty (null) is how to say that
        ({"tpm": 10**30}, "tpm"),
        ({"tokens_per_day": 10**15}, "tokens_per_day"),
        ({"max_concurrency": 2**31}, "max_concurrency"),
        ({"max_tokens_per_request": -1}, "max_tokens_per_request"),
        ({"rpm": "12"}, "rpm"),
        ({"rpm": True}, "rpm"),
        ({"rpm": 1.5}, "rpm"),
        ({"priority": "urgent"}, "priority"),
        ({"name": "x" * 10240}, "name"),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "Legal\x00"}, "name"),
        ({"name": "Legal"}, "name"),  # taken
        ({"name": None}, "name"),
        ({"contact": "c" * 10240}, "contact"),
        ({"deployment_ids": [987654]}, "deployment_ids"),
        ({"deployment_ids": ["chat"]}, "deployment_ids"),
    ],
)
def test_create_refuses_bad_input_naming_the_field(world: dict, body: dict, field: str) -> None:
    before = Department.objects.count()
    response = world["admin"].post(BASE, {"name": "New", **body})
    assert response.status_code in (400, 422), response.content
    assert field in detail_text(response)
    assert Department.objects.count() == before
    assert not AuditEvent.objects.filter(action="department.create").exists()


def test_the_pages_form_refuses_the_same_quotas(world: dict) -> None:
    from tenancy.forms import DepartmentForm, KeyForm

    for rpm in (0, -5, 10**30):
        assert set(DepartmentForm({"name": "Ops", "priority": "normal", "rpm": rpm}).errors) == {"rpm"}
        assert set(KeyForm({"name": "k", "rpm": rpm}).errors) == {"rpm"}


def test_patch_refuses_bad_input_and_writes_nothing(world: dict) -> None:
    admin, legal = world["admin"], world["legal"]
    url = f"{BASE}/{legal.pk}"
    for body, field in [({"rpm": -1}, "rpm"), ({"deployment_ids": [987654]}, "deployment_ids"),
                        ({"name": "Sales"}, "name"), ({"name": "L" * 10240}, "name"), ({"priority": None}, "priority"),
                        ({"tokens_per_month": 10**14, "contact": "ok"}, "tokens_per_month")]:  # fmt: skip
        response = admin("PATCH", url, body)
        assert response.status_code == 422, (body, response.content)
        assert field in detail_text(response)
    legal.refresh_from_db()
    assert (legal.name, legal.rpm, legal.contact) == ("Legal", 100, "")
    assert set(legal.deployments.values_list("name", flat=True)) == {"chat", "embed"}
    assert not AuditEvent.objects.filter(action="department.update").exists()
    # Sending one field changes only that one; sending nothing changes (and audits) nothing.
    assert admin("PATCH", url, {"contact": "legal@example.com"}).json()["rpm"] == 100
    assert admin("PATCH", url, {}).status_code == 200
    assert AuditEvent.objects.filter(action="department.update").count() == 1


def test_department_admin_gets_404_for_everything_of_another_department(world: dict) -> None:
    dora, sales, key = world["dora"], world["sales"], world["sales_key"]
    sam_id = sales.memberships.get().user_id
    assert [d["name"] for d in dora.get(BASE).json()] == ["Legal"]
    for department_id in (sales.pk, 987654):  # another department looks exactly like a missing one
        base = f"{BASE}/{department_id}"
        for method, path, body in [
            ("GET", "", None), ("PATCH", "", {"rpm": 1}), ("DELETE", "", None),
            ("GET", "/members", None), ("POST", "/members", {"username": "dora", "role": "department_admin"}),
            ("DELETE", f"/members/{sam_id}", None),
            ("GET", "/keys", None), ("POST", "/keys", {"name": "mine now"}), ("GET", f"/keys/{key.pk}", None),
            ("POST", f"/keys/{key.pk}/revoke", {}), ("POST", f"/keys/{key.pk}/rotate", {"grace_seconds": 0}),
        ]:  # fmt: skip
            response = dora(method, base + path, body)
            assert response.status_code == 404, (method, path, response.content)
            assert "Sales" not in response.content.decode() and "sales bot" not in response.content.decode()
    # Guessing Sales' key id under Legal's own URL does not work either.
    legal_url = f"{BASE}/{world['legal'].pk}/keys/{key.pk}"
    assert dora.get(legal_url).status_code == 404
    assert dora.post(legal_url + "/revoke").status_code == 404
    assert dora.post(legal_url + "/rotate", {"grace_seconds": 0}).status_code == 404
    key.refresh_from_db()
    assert key.is_usable and key.replaced_by is None and ApiKey.authenticate(world["sales_raw"]) == key
    sales.refresh_from_db()
    assert sales.tpm == 5000 and sales.memberships.count() == 1 and sales.api_keys.count() == 1
    assert not AuditEvent.objects.filter(outcome="ok").exclude(action__startswith="auth.").exists()


def test_department_admin_manages_own_keys_but_not_the_department(world: dict) -> None:
    dora, legal = world["dora"], world["legal"]
    url = f"{BASE}/{legal.pk}"
    issued = dora.post(f"{url}/keys", {"name": "contracts", "rpm": 10, "deployment_ids": [world["chat"].pk]})
    assert issued.status_code == 201, issued.content
    assert issued.json()["deployment_ids"] == [world["chat"].pk] and issued.json()["created_by"] == "dora"
    key = ApiKey.authenticate(issued.json()["secret"])
    assert key.department == legal and key.allowed_deployment_ids() == {world["chat"].pk}
    assert dora.post(f"{url}/keys/{key.pk}/revoke").json()["state"] == "revoked"

    refusals = [
        ("POST", BASE, {"name": "Mine"}, "department.create"),
        ("PATCH", url, {"rpm": 100000}, "department.update"),
        ("PATCH", url, {"contact": "me"}, "department.update"),
        ("DELETE", url, None, "department.delete"),
        ("POST", f"{url}/members", {"username": "victor", "role": "department_admin"}, "department.member_set"),
        ("DELETE", f"{url}/members/{legal.memberships.get().user_id}", None, "department.member_remove"),
    ]
    for method, path, body, action in refusals:
        assert dora(method, path, body).status_code == 403, (method, path)
        assert AuditEvent.objects.filter(action=action, outcome="denied", actor_name="dora").exists(), action
    legal.refresh_from_db()
    assert (legal.rpm, legal.contact, legal.memberships.count()) == (100, "", 1)
    assert Department.objects.count() == 2


def test_viewer_reads_everything_and_changes_nothing(world: dict) -> None:
    viewer, sales, key = world["viewer"], world["sales"], world["sales_key"]
    assert {d["name"] for d in viewer.get(BASE).json()} == {"Legal", "Sales"}
    assert [k["name"] for k in viewer.get(f"{BASE}/{sales.pk}/keys").json()] == ["sales bot"]
    assert [m["username"] for m in viewer.get(f"{BASE}/{sales.pk}/members").json()] == ["sam"]
    for method, path, body in [
        ("POST", f"{BASE}/{sales.pk}/keys", {"name": "x"}),
        ("POST", f"{BASE}/{sales.pk}/keys/{key.pk}/revoke", {}),
        ("POST", f"{BASE}/{sales.pk}/keys/{key.pk}/rotate", {}),
        ("PATCH", f"{BASE}/{sales.pk}", {"tpm": 1}),
        ("POST", BASE, {"name": "Ops"}),
    ]:
        assert viewer(method, path, body).status_code == 403, (method, path)
    assert AuditEvent.objects.filter(outcome="denied", actor_name="victor").count() == 5
    assert ApiKey.objects.count() == 1 and ApiKey.authenticate(world["sales_raw"]) == key


def test_key_deployments_can_only_narrow_the_department(world: dict) -> None:
    admin, legal = world["admin"], world["legal"]
    url = f"{BASE}/{legal.pk}/keys"
    widening = admin.post(url, {"name": "k", "deployment_ids": [world["chat"].pk, world["other"].pk]})
    assert widening.status_code == 400
    assert "deployment_ids" in detail_text(widening) and str(world["other"].pk) in detail_text(widening)
    unknown = admin.post(url, {"name": "k", "deployment_ids": [987654]})
    assert unknown.status_code == 422 and "deployment_ids" in detail_text(unknown)
    assert ApiKey.objects.count() == 1 and not AuditEvent.objects.filter(action="api_key.issue").exists()
    narrowed = admin.post(url, {"name": "k", "deployment_ids": [world["embed"].pk]})
    assert narrowed.status_code == 201 and narrowed.json()["deployment_ids"] == [world["embed"].pk]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rpm": -1}, "rpm"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"tpm": 10**20}, "tpm"),
        ({"max_tokens_per_request": "lots"}, "max_tokens_per_request"),
        ({"name": "k" * 10240}, "name"),
        ({"name": ""}, "name"),
        ({"name": "bot\x00"}, "name"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "2999-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "next tuesday"}, "expires_at"),
    ],
)
def test_key_issue_refuses_bad_input(world: dict, body: dict, field: str) -> None:
    response = world["admin"].post(f"{BASE}/{world['legal'].pk}/keys", {"name": "k", **body})
    assert response.status_code == 422, response.content
    assert field in detail_text(response)
    assert ApiKey.objects.count() == 1
    assert not AuditEvent.objects.filter(action="api_key.issue").exists()


def test_secret_only_in_the_issue_and_rotate_responses(world: dict) -> None:
    admin, legal = world["admin"], world["legal"]
    url = f"{BASE}/{legal.pk}/keys"
    expires = (timezone.now() + timedelta(days=30)).isoformat()
    issued = admin.post(url, {"name": "contracts", "expires_at": expires, "max_tokens_per_request": 2048})
    assert issued.status_code == 201 and "no-store" in issued["Cache-Control"]
    raw = issued.json()["secret"]
    key = ApiKey.authenticate(raw)
    assert key is not None and key.max_tokens_per_request == 2048 and issued.json()["expires_at"] is not None
    assert issued.json()["hint"] == raw[:11] + "…"

    rotated = admin.post(f"{url}/{key.pk}/rotate", {"grace_seconds": 600})
    assert rotated.status_code == 201 and "no-store" in rotated["Cache-Control"]
    new_raw = rotated.json()["secret"]
    new = ApiKey.authenticate(new_raw)
    assert new.max_tokens_per_request == 2048 and new.expires_at == key.expires_at
    assert ApiKey.authenticate(raw) == key  # still works during the grace period
    states = {k["id"]: k["state"] for k in admin.get(url).json()}
    assert states == {key.pk: "grace", new.pk: "active"}

    shown = [admin.get(url), admin.get(f"{url}/{key.pk}"), admin.get(f"{url}/{new.pk}"), admin.get(BASE),
             admin.get("/api/v1/audit-events"), admin.post(f"{url}/{new.pk}/revoke")]  # fmt: skip
    for response in shown:
        assert response.status_code == 200
        body = response.content.decode()
        assert raw not in body and new_raw not in body and "secret" not in response.json()
    for event in AuditEvent.objects.all():
        text = json.dumps([event.target_repr, event.detail])
        assert raw not in text and new_raw not in text and raw[7:17] not in text  # not even the key id
    assert {"api_key.issue", "api_key.rotate", "api_key.revoke"} <= set(
        AuditEvent.objects.filter(outcome="ok").values_list("action", flat=True)
    )
    assert ApiKey.authenticate(new_raw) is None


def test_rotate_grace_bounds_and_refusals(world: dict) -> None:
    admin, sales, key = world["admin"], world["sales"], world["sales_key"]
    url = f"{BASE}/{sales.pk}/keys/{key.pk}"
    for grace in (-1, 7 * 86400 + 1, "soon"):  # longer than the page's form allows (7 days) included
        response = admin.post(f"{url}/rotate", {"grace_seconds": grace})
        assert response.status_code == 422 and "grace_seconds" in detail_text(response)
    from tenancy.forms import RotateForm

    assert (
        not RotateForm({"grace_minutes": 7 * 1440 + 1}).is_valid()
        and RotateForm({"grace_minutes": 7 * 1440}).is_valid()
    )
    assert RotateForm().fields["grace_minutes"].initial * 60 == 3600  # the API's default too
    assert ApiKey.objects.count() == 1
    rotated = admin.post(f"{url}/rotate", {"grace_seconds": 0})
    assert rotated.status_code == 201
    assert ApiKey.authenticate(world["sales_raw"]) is None  # no grace: the old key stops at once
    assert admin.post(f"{url}/rotate", {"grace_seconds": 60}).status_code == 409  # already rotated
    new_id = rotated.json()["id"]
    admin.post(f"{BASE}/{sales.pk}/keys/{new_id}/revoke")
    assert admin.post(f"{BASE}/{sales.pk}/keys/{new_id}/rotate", {}).status_code == 409  # revoked
    assert admin.post(f"{url}/rotate", {"grace_seconds": 7 * 86400}).status_code == 409


def test_members_are_added_changed_and_removed(world: dict, viewer_user: Any) -> None:
    admin, legal = world["admin"], world["legal"]
    url = f"{BASE}/{legal.pk}/members"
    added = admin.post(url, {"username": "victor"})
    victor = viewer_user.pk
    assert added.status_code == 201 and added.json() == {"user_id": victor, "username": "victor", "role": "viewer"}
    changed = admin.post(url, {"user_id": victor, "role": "department_admin"})
    assert changed.status_code == 200 and changed.json()["role"] == "department_admin"
    assert [(m["username"], m["role"]) for m in admin.get(url).json()] == [
        ("dora", "department_admin"), ("victor", "department_admin")
    ]  # fmt: skip
    for body, field in [({"username": "nobody"}, "username"), ({"username": "victor", "role": "owner"}, "role"),
                        ({"username": "v" * 10240}, "username")]:  # fmt: skip
        response = admin.post(url, body)
        assert response.status_code == 422 and field in detail_text(response)
    assert admin("DELETE", f"{url}/{victor}").status_code == 204
    assert admin("DELETE", f"{url}/{victor}").status_code == 404
    assert list(legal.memberships.values_list("user__username", flat=True)) == ["dora"]
    actions = list(AuditEvent.objects.filter(outcome="ok").values_list("action", flat=True))
    assert actions.count("department.member_set") == 2 and actions.count("department.member_remove") == 1


def test_session_of_the_console_reads_the_api(admin_client: Client, world: dict) -> None:
    assert {d["name"] for d in admin_client.get(BASE).json()} == {"Legal", "Sales"}
