"""Sign-in: the password change page, and the first admin held there until the printed password is changed."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import AsyncClient, Client
from django.urls import reverse

from appliance.middleware import API_MESSAGE
from appliance.models import AuditEvent, Profile
from appliance.roles import Role
from tests.conftest import make_user

pytestmark = pytest.mark.django_db

NEW = "a-new-long-Passphrase-42"


def change(client: Client, old: str, new: str = NEW, again: str | None = None) -> Any:
    return client.post(
        reverse("password-change"),
        {"old_password": old, "new_password1": new, "new_password2": new if again is None else again},
    )


def first_admin() -> tuple[Client, str]:
    """``ensure_admin`` as ``make run`` runs it, and a browser signed in with the password it printed."""
    out = io.StringIO()
    call_command("ensure_admin", stdout=out)
    password = out.getvalue().split("Password:")[1].split()[0]
    client = Client()
    assert client.post(reverse("login"), {"username": "admin", "password": password}).status_code == 302
    return client, password


# --- The password change page ------------------------------------------------------------------------------


def test_password_change_page_is_linked_from_the_user_menu_and_changes_the_password(admin_client: Client) -> None:
    overview = admin_client.get(reverse("dashboard:overview")).content.decode()
    assert f'href="{reverse("password-change")}"' in overview
    page = admin_client.get(reverse("password-change"))
    assert page.status_code == 200
    html = page.content.decode()
    assert "<h1>Change password</h1>" in html and 'name="old_password"' in html and 'name="new_password2"' in html
    response = change(admin_client, "pw-alice")
    assert response.status_code == 302 and response["Location"] == reverse("dashboard:overview")
    # Still signed in after the change (the session follows the new password), and told so.
    assert "Your password was changed." in admin_client.get(reverse("dashboard:overview")).content.decode()
    user = get_user_model().objects.get(username="alice")
    assert user.check_password(NEW)
    event = AuditEvent.objects.get(action="user.change_password")
    assert event.actor_name == "alice" and NEW not in json.dumps(event.detail)


def test_password_change_page_in_chinese(admin_client: Client) -> None:
    admin_client.cookies["django_language"] = "zh-hans"
    html = admin_client.get(reverse("password-change")).content.decode()
    assert "<h1>修改密码</h1>" in html and "旧密码" in html
    refused = change(admin_client, "pw-alice", new="pw-alice").content.decode()
    assert "新密码不能与当前密码相同。" in refused


@pytest.mark.parametrize(
    ("old", "new", "again", "field", "message"),
    [
        ("wrong", NEW, None, "old_password", "Your old password was entered incorrectly"),
        ("pw-alice", NEW, NEW + "x", "new_password2", "The two password fields didn’t match."),
        ("pw-alice", "pw-alice", None, "new_password1", "The new password must differ from the current one."),
        ("pw-alice", "short", None, "new_password2", "This password is too short."),
        ("pw-alice", "password123", None, "new_password2", "This password is too common."),
        ("pw-alice", "48120937561", None, "new_password2", "This password is entirely numeric."),
    ],
)
def test_bad_password_changes_are_refused_next_to_the_field(
    admin_client: Client, old: str, new: str, again: str | None, field: str, message: str
) -> None:
    response = change(admin_client, old, new, again)
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert field in errors and any(message in error for error in errors[field]), errors
    assert message in response.content.decode()
    assert get_user_model().objects.get(username="alice").check_password("pw-alice")
    assert not AuditEvent.objects.filter(action="user.change_password").exists()


def test_password_change_needs_login(client: Client) -> None:
    response = client.get(reverse("password-change"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


# --- The first admin must change the printed password ------------------------------------------------------


def test_first_admin_is_held_at_the_change_page_until_the_printed_password_is_changed() -> None:
    client, printed = first_admin()
    other = make_user("alice", Role.APPLIANCE_ADMIN)
    admin = get_user_model().objects.get(username="admin")
    assert admin.profile.must_change_password
    for url in (reverse("dashboard:overview"), reverse("users"), reverse("tokens"), reverse("audit"), "/models/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"] == reverse("password-change"), url
    # A change sent anywhere is refused the same way, and changes nothing.
    assert client.post(reverse("user-create"), {"username": "mallory", "role": "viewer"}).status_code == 302
    assert not get_user_model().objects.filter(username="mallory").exists()
    page = client.get(reverse("password-change"))
    assert page.status_code == 200 and "choose your own before going on" in page.content.decode()
    # The language switch and the static files stay reachable from the change page.
    assert client.post(reverse("set_language"), {"language": "zh-hans", "next": "/"}).status_code == 302
    assert client.get("/static/dashboard/console.css").status_code == 200
    # The printed password cannot be kept.
    assert change(client, printed, new=printed).status_code == 200
    assert change(client, printed).status_code == 302
    admin.profile.refresh_from_db()
    assert not admin.profile.must_change_password
    assert client.get(reverse("dashboard:overview")).status_code == 200
    assert client.get(reverse("users")).status_code == 200
    # Others are never held: alice, made by another path, has no flag.
    assert not Profile.objects.get(user=other).must_change_password
    alice = Client()
    alice.force_login(other)
    assert alice.get(reverse("dashboard:overview")).status_code == 200


def test_first_admin_session_gets_403_from_the_management_api_until_changed() -> None:
    client, printed = first_admin()
    for method, url in (("get", "/api/v1/me"), ("get", "/api/v1/audit-events"), ("post", "/api/v1/tokens")):
        response = getattr(client, method)(url, content_type="application/json")
        assert response.status_code == 403, (url, response.content)
        assert response.json() == {"detail": API_MESSAGE}
    change(client, printed)
    assert client.get("/api/v1/me").json()["username"] == "admin"


def test_first_admin_can_log_out_before_changing() -> None:
    client, _ = first_admin()
    assert client.post(reverse("logout")).status_code == 302
    response = client.get(reverse("dashboard:overview"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_the_hold_also_works_when_django_serves_asynchronously() -> None:
    """Under ASGI the middleware runs async (the hub mirror's views are async and must not be pushed onto
    a thread): a held session is redirected there too, and the mirror answers as before."""
    held, printed = first_admin()
    client = AsyncClient()
    client.cookies = held.cookies
    response = async_to_sync(client.get)(reverse("users"))
    assert response.status_code == 302 and response["Location"] == reverse("password-change")
    assert async_to_sync(client.get)("/api/v1/me").status_code == 403
    assert async_to_sync(client.get)("/hf/api/models/acme/none").status_code == 401  # token-only, as before
    change(held, printed)
    client.cookies = held.cookies
    assert async_to_sync(client.get)(reverse("users")).status_code == 200
