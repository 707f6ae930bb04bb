"""Login, rate-limited failures, roles, 403 with an audit event, CSRF and the error pages."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from appliance.models import AuditEvent
from appliance.roles import Role, department_ids, register_department_lookup, role_of
from tests.conftest import make_user

pytestmark = pytest.mark.django_db


def login(client: Client, username: str, password: str, ip: str = "10.0.0.1") -> Any:
    return client.post(reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=ip)


def test_login_page_and_successful_login_is_audited(client: Client, admin_user: Any) -> None:
    page = client.get(reverse("login"))
    assert page.status_code == 200
    assert b'name="username"' in page.content
    response = login(client, "alice", "pw-alice")
    assert response.status_code == 302
    assert client.get(reverse("dashboard:overview")).status_code == 200
    event = AuditEvent.objects.get(action="auth.login")
    assert event.actor_name == "alice"
    assert event.source_ip == "10.0.0.1"


def test_pages_need_login(client: Client) -> None:
    response = client.get(reverse("audit"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_a_form_sent_after_the_session_expired_returns_to_its_page_after_login(client: Client, admin_user: Any) -> None:
    from tenancy.models import Department

    legal = Department.objects.create(name="Legal")
    page = f"http://testserver/departments/{legal.pk}/"
    for url in (reverse("tenancy:create"), reverse("tenancy:issue-key", args=[legal.pk])):
        response = client.post(url, {"name": "x"}, HTTP_REFERER=page)
        assert response.status_code == 302 and response["Location"] == f"/login/?next=/departments/{legal.pk}/"
        # Not to the URL the form posts to (GET there is 405), nor to another site's page.
        elsewhere = client.post(url, {"name": "x"}, HTTP_REFERER="http://evil.example/departments/")
        assert elsewhere["Location"] == "/login/?next=" + url
    assert not Department.objects.exclude(pk=legal.pk).exists()


def test_wrong_password_is_refused_and_recorded(client: Client, admin_user: Any) -> None:
    response = login(client, "alice", "wrong")
    assert response.status_code == 200
    assert b"errorlist" in response.content
    event = AuditEvent.objects.get(action="auth.login_failed")
    assert event.outcome == "failed"
    assert event.detail == {"username": "alice"}


def test_failed_logins_lock_out_an_ip_address(client: Client, admin_user: Any, settings: Any) -> None:
    for attempt in range(settings.AXES_FAILURE_LIMIT):
        login(client, f"nobody{attempt}", "wrong", ip="10.0.0.7")
    # Even the right password is refused from that address now...
    assert login(client, "alice", "pw-alice", ip="10.0.0.7").status_code == 429
    # ...but the same user from another address still gets in.
    assert login(Client(), "alice", "pw-alice", ip="10.0.0.8").status_code == 302


def test_failed_logins_lock_out_a_user_name_from_that_address_only(
    client: Client, admin_user: Any, settings: Any
) -> None:
    for _attempt in range(settings.AXES_FAILURE_LIMIT):
        login(Client(), "alice", "wrong", ip="10.0.1.1")
    locked = login(client, "alice", "pw-alice", ip="10.0.1.1")
    assert locked.status_code == 429
    assert b"Too many failed logins" in locked.content
    # Nobody can lock the admin out from another machine: from address B alice still gets in...
    assert login(Client(), "alice", "pw-alice", ip="10.0.2.1").status_code == 302
    # ...which does not lift the lock-out of address A.
    assert login(Client(), "alice", "pw-alice", ip="10.0.1.1").status_code == 429


def test_failures_spread_over_addresses_lock_out_none_of_them(admin_user: Any, settings: Any) -> None:
    for attempt in range(settings.AXES_FAILURE_LIMIT * 2):
        login(Client(), "alice", "wrong", ip=f"10.0.3.{attempt}")
    assert login(Client(), "alice", "pw-alice", ip="10.0.3.0").status_code == 302
    assert login(Client(), "alice", "pw-alice", ip="10.0.4.1").status_code == 302


def test_viewer_posting_an_admin_action_gets_403_and_an_audit_event(viewer_client: Client, admin_user: Any) -> None:
    response = viewer_client.post(reverse("user-create"), {"username": "mallory", "role": Role.APPLIANCE_ADMIN})
    assert response.status_code == 403
    assert b"audit log" in response.content
    event = AuditEvent.objects.get(outcome="denied")
    assert event.actor_name == "victor"
    assert event.detail["path"] == reverse("user-create")
    assert not AuditEvent.objects.filter(action="user.create").exists()
    from django.contrib.auth import get_user_model

    assert not get_user_model().objects.filter(username="mallory").exists()


@pytest.mark.parametrize("url_name", ["token-create", "user-create"])
def test_department_admin_cannot_use_appliance_admin_actions(
    client: Client, dept_admin_user: Any, url_name: str
) -> None:
    client.force_login(dept_admin_user)
    assert client.post(reverse(url_name), {"name": "x", "username": "x"}).status_code == 403


def test_admin_creates_user_with_one_time_password(admin_client: Client) -> None:
    response = admin_client.post(reverse("user-create"), {"username": "bob", "role": Role.VIEWER, "email": ""})
    assert response.status_code == 200
    password = response.context["secret"]
    event = AuditEvent.objects.get(action="user.create")
    assert event.actor_name == "alice"
    assert event.target_repr == "bob"
    assert password not in str(event.detail)
    assert login(Client(), "bob", password).status_code == 302


def test_user_form_errors_are_next_to_the_field(admin_client: Client) -> None:
    response = admin_client.post(reverse("user-create"), {"username": "bad name!", "role": "emperor"})
    assert response.status_code == 400
    form = response.context["form"]
    assert set(form.errors) == {"username", "role"}


def test_role_change_and_deactivation_are_audited(admin_client: Client, viewer_user: Any) -> None:
    admin_client.post(reverse("user-set-role", args=[viewer_user.pk]), {"role": Role.DEPARTMENT_ADMIN})
    viewer_user.refresh_from_db()
    assert role_of(viewer_user) == Role.DEPARTMENT_ADMIN
    admin_client.post(reverse("user-toggle-active", args=[viewer_user.pk]))
    viewer_user.refresh_from_db()
    assert not viewer_user.is_active
    assert role_of(viewer_user) is None
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"user.set_role", "user.deactivate"} <= actions


def test_admin_cannot_demote_self(admin_client: Client, admin_user: Any) -> None:
    admin_client.post(reverse("user-set-role", args=[admin_user.pk]), {"role": Role.VIEWER})
    admin_user.refresh_from_db()
    assert role_of(admin_user) == Role.APPLIANCE_ADMIN


def test_forged_csrf_token_is_refused(admin_user: Any) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    client.get(reverse("users"))  # sets the real CSRF cookie
    response = client.post(
        reverse("user-create"), {"username": "eve", "role": Role.VIEWER, "csrfmiddlewaretoken": "x" * 64}
    )
    assert response.status_code == 403
    assert b"security token" in response.content
    assert AuditEvent.objects.filter(action="security.csrf_refused").exists()
    assert not AuditEvent.objects.filter(action="user.create").exists()


def test_unknown_url_gets_the_console_404_in_english(admin_client: Client) -> None:
    response = admin_client.get("/no/such/page/")
    assert response.status_code == 404
    assert b"Page not found" in response.content
    assert b"main-nav" in response.content


def test_unknown_url_gets_the_console_404_in_chinese(admin_client: Client) -> None:
    admin_client.post(reverse("set_language"), {"language": "zh-hans", "next": "/"})
    response = admin_client.get("/no/such/page/")
    assert response.status_code == 404
    assert "页面不存在".encode() in response.content
    assert b'lang="zh-hans"' in response.content


def test_department_scope_hook() -> None:
    admin = make_user("a1", Role.APPLIANCE_ADMIN)
    viewer = make_user("v1", Role.VIEWER)
    dept_admin = make_user("d1", Role.DEPARTMENT_ADMIN)
    assert department_ids(admin) is None
    assert department_ids(viewer) is None
    from appliance import roles

    original = roles._department_lookup
    register_department_lookup(lambda user: {7: "department_admin", 8: "viewer"} if user.username == "d1" else {})
    try:
        assert department_ids(dept_admin) == {7, 8}
        assert roles.managed_department_ids(dept_admin) == {7}
        register_department_lookup(None)  # type: ignore[arg-type]
        # Without a lookup a department admin sees no department, never all of them.
        assert department_ids(dept_admin) == set()
    finally:
        register_department_lookup(original)  # type: ignore[arg-type]


def test_the_users_page_is_paged_searchable_and_shows_roles_and_memberships(admin_client: Client,
                                                                            admin_user: Any) -> None:  # fmt: skip
    from django.contrib.auth import get_user_model

    from appliance.roles import Role
    from tenancy.models import Department, Membership
    from tests.conftest import make_user

    for n in range(60):
        make_user(f"staff{n:02}", Role.VIEWER, email=f"staff{n:02}@example.com")
    dora = make_user("dora", Role.DEPARTMENT_ADMIN, email="dora@finance.example.com")
    Membership.objects.create(user=dora, department=Department.objects.create(name="Finance"), role="department_admin")
    demoted = get_user_model().objects.create_superuser("root2", password="pw-root2-long-enough")
    from appliance.models import Profile

    Profile.objects.create(user=demoted, role=Role.VIEWER)  # a superuser demoted to viewer
    first = admin_client.get(reverse("users")).content.decode()
    assert "Page 1 of 2" in first and "staff00" in first and "staff59" not in first
    found = admin_client.get(reverse("users"), {"q": "finance"}).content.decode()
    assert "dora" in found and "staff01" not in found and ">Finance</a>" in found and "(Department admin)" in found
    assert "staff59" in admin_client.get(reverse("users"), {"page": 2}).content.decode()
    root2 = first[first.index("root2") :][:200]
    assert "Global viewer" in root2 and "Appliance admin" not in root2  # the profile's role, superuser or not
    assert "No user matches the search." in admin_client.get(reverse("users"), {"q": "nobody-at-all"}).content.decode()
