"""The management API: token auth, roles, audit and the OpenAPI schema."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from appliance.models import ApiToken, AuditEvent
from appliance.roles import Role

pytestmark = pytest.mark.django_db


def bearer(raw: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {raw}"}


def test_openapi_schema_is_served_and_describes_the_endpoints(client: Client) -> None:
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert {"/api/v1/me", "/api/v1/health", "/api/v1/audit-events", "/api/v1/users"} <= set(schema["paths"])
    assert "bearer" in str(schema["components"]["securitySchemes"]).lower()


def test_api_docs_use_only_local_assets(admin_client: Client) -> None:
    page = admin_client.get("/api/v1/docs").content.decode()
    assert "cdn" not in page.lower()
    assert "/static/ninja/" in page


def test_no_token_is_401(client: Client) -> None:
    assert client.get("/api/v1/me").status_code == 401


@pytest.mark.parametrize("raw", ["", "apc_wrong", "Bearer", "x" * 500, "apc_" + "ä" * 10])
def test_bad_tokens_are_401(client: Client, raw: str, admin_user: Any) -> None:
    assert client.get("/api/v1/me", **bearer(raw)).status_code == 401


def test_token_lifecycle_through_the_ui_and_api(admin_client: Client, admin_user: Any) -> None:
    response = admin_client.post(reverse("token-create"), {"name": "backup", "expires_in_days": 30})
    raw = response.context["secret"]
    assert raw.startswith("apc_")
    token = ApiToken.objects.get()
    assert raw not in (token.token_hash, token.hint)
    me = Client().get("/api/v1/me", **bearer(raw))
    assert me.json() == {"username": "alice", "role": "appliance_admin"}
    token.refresh_from_db()
    assert token.last_used_at is not None
    # The list shows the hint, never the token.
    assert raw not in admin_client.get(reverse("tokens")).content.decode()
    admin_client.post(reverse("token-revoke", args=[token.pk]))
    assert Client().get("/api/v1/me", **bearer(raw)).status_code == 401
    assert list(AuditEvent.objects.filter(target_type="appliance.apitoken").values_list("action", flat=True)) == [
        "api_token.revoke",
        "api_token.create",
    ]


def test_expired_token_is_401(admin_user: Any, client: Client) -> None:
    _, raw = ApiToken.issue(admin_user, "old", timezone.now() - timedelta(seconds=1))
    assert client.get("/api/v1/me", **bearer(raw)).status_code == 401


def test_token_of_deactivated_user_is_401(admin_user: Any, client: Client) -> None:
    _, raw = ApiToken.issue(admin_user, "t")
    admin_user.is_active = False
    admin_user.save()
    assert client.get("/api/v1/me", **bearer(raw)).status_code == 401


def test_token_create_form_errors(admin_client: Client) -> None:
    response = admin_client.post(reverse("token-create"), {"name": "", "expires_in_days": -3})
    assert response.status_code == 400
    assert set(response.context["form"].errors) == {"name", "expires_in_days"}
    assert not ApiToken.objects.exists()


def test_admin_cannot_revoke_another_admins_token(admin_client: Client) -> None:
    from tests.conftest import make_user

    other = make_user("olga", Role.APPLIANCE_ADMIN)
    token, _ = ApiToken.issue(other, "hers")
    assert admin_client.post(reverse("token-revoke", args=[token.pk])).status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None


def test_admin_creates_user_through_the_api(admin_user: Any, client: Client) -> None:
    _, raw = ApiToken.issue(admin_user, "automation")
    response = client.post(
        "/api/v1/users", {"username": "carol", "role": "viewer"}, content_type="application/json", **bearer(raw)
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["username"] == "carol" and len(body["password"]) >= 12
    event = AuditEvent.objects.get(action="user.create")
    assert event.detail == {"role": "viewer", "via": "api"}


@pytest.mark.parametrize(
    "payload",
    [{"username": "bad name"}, {"username": "x", "role": "emperor"}, {"username": ""}, {}],
)
def test_api_user_create_refuses_bad_input(admin_user: Any, client: Client, payload: dict) -> None:
    _, raw = ApiToken.issue(admin_user, "automation")
    response = client.post("/api/v1/users", payload, content_type="application/json", **bearer(raw))
    assert response.status_code == 422
    assert AuditEvent.objects.filter(action="user.create").count() == 0


def test_duplicate_user_via_api_is_422(admin_user: Any, client: Client) -> None:
    _, raw = ApiToken.issue(admin_user, "automation")
    response = client.post("/api/v1/users", {"username": "ALICE"}, content_type="application/json", **bearer(raw))
    assert response.status_code == 422
    assert "already exists" in response.json()["detail"]


def test_demoted_admins_token_cannot_change_things(admin_user: Any, client: Client) -> None:
    _, raw = ApiToken.issue(admin_user, "automation")
    admin_user.is_superuser = False
    admin_user.save()
    admin_user.profile.role = Role.VIEWER
    admin_user.profile.save()
    assert client.get("/api/v1/me", **bearer(raw)).json()["role"] == "viewer"
    response = client.post("/api/v1/users", {"username": "x"}, content_type="application/json", **bearer(raw))
    assert response.status_code == 403
    assert AuditEvent.objects.get(outcome="denied").detail["via"] == "api"


def test_audit_events_endpoint_filters(admin_user: Any, client: Client) -> None:
    from appliance.audit import record

    record(None, "user.create", actor=admin_user)
    record(None, "user.deactivate", actor=admin_user, outcome="ok")
    record(None, "user.create", outcome="denied")
    _, raw = ApiToken.issue(admin_user, "t")
    rows = client.get("/api/v1/audit-events?action=user.create", **bearer(raw)).json()
    assert len(rows) == 2
    rows = client.get("/api/v1/audit-events?action=user.create&outcome=denied", **bearer(raw)).json()
    assert [r["outcome"] for r in rows] == ["denied"]
    assert client.get("/api/v1/audit-events?limit=0", **bearer(raw)).status_code == 422
    assert client.get("/api/v1/audit-events?since=yesterday", **bearer(raw)).status_code == 422
    # An offset PostgreSQL cannot hold (past ±15:59) is read in UTC, not sent to the database (was a 500
    # on PostgreSQL); one that leaves the calendar once in UTC is refused.
    far = client.get("/api/v1/audit-events", {"since": "0777-01-16T20:03:54-19:12"}, **bearer(raw))
    assert far.status_code == 200 and len(far.json()) == 3
    assert client.get("/api/v1/audit-events", {"until": "0001-01-01T00:00:00+05:00"}, **bearer(raw)).status_code == 422
    naive = client.get("/api/v1/audit-events", {"until": "2000-01-01T00:00:00"}, **bearer(raw))
    assert naive.status_code == 200 and naive.json() == []


def test_session_auth_needs_csrf_for_writes(admin_user: Any) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    assert client.get("/api/v1/me").status_code == 200
    response = client.post("/api/v1/users", {"username": "z"}, content_type="application/json")
    assert response.status_code in (401, 403)
