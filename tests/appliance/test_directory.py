"""Directory sign-in against a real OpenLDAP server (tests/appliance/ldap_server.py): sign-in through
the sign-in page, group → role and group → department mappings applied at every sign-in, removal
from a group, wrong password, a directory that does not answer (local admin still signs in), a
local account never taken over, StartTLS, the Settings page and its connection test (page and API)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.urls import reverse

from appliance.env import env_mapping
from appliance.models import AuditEvent, Profile
from appliance.roles import Role, role_of
from tenancy.models import Department, Membership
from tests.appliance.ldap_server import GROUPS, PEOPLE, SERVICE_DN, SERVICE_PASSWORD, Slapd


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: Any) -> Iterator[Slapd]:
    server = Slapd(Path(tmp_path_factory.mktemp("slapd"))).start()
    yield server
    server.stop()


@pytest.fixture
def directory(settings: Any, slapd: Slapd, db: None) -> Slapd:
    settings.LDAP_SERVER_URI = slapd.uri
    settings.LDAP_START_TLS = True
    settings.LDAP_CA_FILE = slapd.ca_file
    settings.LDAP_BIND_DN, settings.LDAP_BIND_PASSWORD = SERVICE_DN, SERVICE_PASSWORD
    settings.LDAP_USER_BASE, settings.LDAP_GROUP_BASE = PEOPLE, GROUPS
    settings.LDAP_ROLE_GROUPS = [(f"cn=ml-admins,{GROUPS}", "appliance_admin")]
    settings.LDAP_DEPARTMENT_GROUPS = [(f"cn=finance,{GROUPS}", "Finance:viewer"),
                                       (f"cn=legal-leads,{GROUPS}", "Legal:admin")]  # fmt: skip
    Department.objects.create(name="Finance")
    Department.objects.create(name="Legal")
    return slapd


def sign_in(client: Any, username: str, password: str) -> Any:
    return client.post(reverse("login"), {"username": username, "password": password})


def user(username: str) -> Any:
    return get_user_model().objects.select_related("profile").get(username=username)


def test_directory_admin_signs_in_with_the_mapped_role(client: Any, directory: Slapd) -> None:
    response = sign_in(client, "alice", "alice-pw")
    assert response.status_code == 302, response.content.decode()[:2000]
    alice = user("alice")
    assert role_of(alice) == Role.APPLIANCE_ADMIN and alice.profile.source == Profile.Source.LDAP
    assert alice.email == "alice@example.org" and not alice.has_usable_password()
    assert client.get(reverse("users")).status_code == 200  # an admin's page
    event = AuditEvent.objects.get(action="auth.directory_login", actor=alice)
    assert event.detail == {"groups": [f"cn=ml-admins,{GROUPS}"], "role": "appliance_admin", "via": "ldap"}
    assert AuditEvent.objects.filter(action="auth.directory_mapping", actor=alice).exists()


def test_department_groups_give_memberships_and_removal_takes_them_away(
    client: Any, directory: Slapd, settings: Any
) -> None:
    assert sign_in(client, "fiona", "fiona-pw").status_code == 302
    fiona = user("fiona")
    assert role_of(fiona) == Role.DEPARTMENT_VIEWER
    assert list(Membership.objects.filter(user=fiona).values_list("department__name", "role")) == [
        ("Finance", "viewer")
    ]
    client.logout()
    directory.add_member("legal-leads", "fiona")  # now also a Legal lead: department admin
    try:
        assert sign_in(client, "fiona", "fiona-pw").status_code == 302
        assert role_of(user("fiona")) == Role.DEPARTMENT_ADMIN
        assert dict(Membership.objects.filter(user=fiona).values_list("department__name", "role")) == {
            "Finance": "viewer", "Legal": "department_admin"}  # fmt: skip
        client.logout()
    finally:
        directory.remove_member("legal-leads", "fiona")
    assert sign_in(client, "fiona", "fiona-pw").status_code == 302  # removed from the group: removed from Legal
    assert dict(Membership.objects.filter(user=fiona).values_list("department__name", "role")) == {"Finance": "viewer"}
    change = AuditEvent.objects.filter(action="auth.directory_mapping", actor=fiona).order_by("-pk").first()
    assert change.detail["removed"] == ["Legal"] and change.detail["role"] == "department_viewer"
    client.logout()

    directory.remove_member("finance", "fiona")  # in no mapped group: refused, account deactivated
    try:
        response = sign_in(client, "fiona", "fiona-pw")
        assert response.status_code == 200
        assert "in no group that this console maps" in response.content.decode()
        assert not user("fiona").is_active
    finally:
        directory.add_member("finance", "fiona")
    assert sign_in(client, "fiona", "fiona-pw").status_code == 302  # back in the group: back in
    assert user("fiona").is_active


def test_in_no_mapped_group_is_refused(client: Any, directory: Slapd) -> None:
    response = sign_in(client, "nobody", "nobody-pw")
    assert response.status_code == 200 and "in no group that this console maps" in response.content.decode()
    assert not user("nobody").is_active
    assert AuditEvent.objects.filter(action="auth.directory_mapping", outcome="denied").exists()


def test_wrong_password_is_the_usual_error(client: Any, directory: Slapd) -> None:
    response = sign_in(client, "alice", "not-her-password")
    assert response.status_code == 200
    body = response.content.decode()
    assert "correct username and password" in body and "directory server" not in body
    assert not get_user_model().objects.filter(username="alice").exists()


def test_directory_down_is_a_clear_error_and_local_admin_still_signs_in(
    client: Any, directory: Slapd, settings: Any, admin_user: Any
) -> None:
    settings.LDAP_SERVER_URI = "ldap://127.0.0.1:1"  # nothing listens there
    settings.LDAP_TIMEOUT_SECONDS = 2
    response = sign_in(client, "fiona", "fiona-pw")
    assert response.status_code == 200
    assert "The directory server did not answer" in response.content.decode()
    admin_user.set_password("local-break-glass-pw")
    admin_user.save()
    assert sign_in(client, admin_user.username, "local-break-glass-pw").status_code == 302


def test_a_local_account_is_never_taken_over(client: Any, directory: Slapd) -> None:
    local, _password = Profile.create_user("lee", Role.VIEWER, "lee@local")
    response = sign_in(client, "lee", "lee-pw")  # lee's directory password is not the local one
    assert response.status_code == 200
    assert user("lee").profile.source == Profile.Source.LOCAL and role_of(user("lee")) == Role.VIEWER
    assert not Membership.objects.filter(user=local).exists()


def test_starttls_refuses_an_untrusted_certificate(client: Any, directory: Slapd, settings: Any,
                                                   tmp_path: Path) -> None:  # fmt: skip
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_text(Path("/etc/ssl/certs/ca-certificates.crt").read_text()
                        if Path("/etc/ssl/certs/ca-certificates.crt").exists() else "")  # fmt: skip
    settings.LDAP_CA_FILE = str(other_ca)
    response = sign_in(client, "alice", "alice-pw")
    assert response.status_code == 200 and "The directory server did not answer" in response.content.decode()


def test_settings_page_masks_the_secret_and_tests_the_connection(admin_client: Any, directory: Slapd,
                                                                 settings: Any) -> None:  # fmt: skip
    page = admin_client.get(reverse("directory")).content.decode()
    assert directory.uri in page and SERVICE_DN in page and SERVICE_PASSWORD not in page and "••••" in page
    assert f"cn=finance,{GROUPS}" in page and "Finance — Viewer" in page  # the roles' names, not their values
    assert "Appliance admin" in page and ">appliance_admin<" not in page
    result = admin_client.post(reverse("directory-test"), follow=True).content.decode()
    assert "4 users and 4 groups found" in result
    api = admin_client.post("/api/v1/directory/test").json()
    assert api["ok"] and api["users"] == 4 and api["groups"] == 4
    shown = admin_client.get("/api/v1/directory").json()
    assert shown["enabled"] and shown["settings"]["LDAP_BIND_PASSWORD"] == "••••••••"
    settings.LDAP_BIND_PASSWORD = "wrong"
    failed = admin_client.post("/api/v1/directory/test").json()
    assert not failed["ok"] and "Invalid credentials" in failed["message"]
    assert AuditEvent.objects.filter(action="directory.test", outcome="failed").exists()
    assert SERVICE_PASSWORD not in str(list(AuditEvent.objects.values_list("detail", flat=True)))


def test_directory_off_by_default(admin_client: Any, client: Any, admin_user: Any) -> None:
    assert "LDAP_SERVER_URI is not set" in admin_client.post("/api/v1/directory/test").json()["message"]
    assert "Off: set LDAP_SERVER_URI" in admin_client.get(reverse("directory")).content.decode()


def test_mapping_settings_are_checked(monkeypatch: Any) -> None:
    monkeypatch.setenv("LDAP_ROLE_GROUPS", "cn=a,dc=x => appliance_admin; cn=b,dc=x=>viewer")
    assert env_mapping("LDAP_ROLE_GROUPS") == [("cn=a,dc=x", "appliance_admin"), ("cn=b,dc=x", "viewer")]
    monkeypatch.setenv("LDAP_ROLE_GROUPS", "cn=a,dc=x appliance_admin")
    with pytest.raises(ImproperlyConfigured, match="LDAP_ROLE_GROUPS"):
        env_mapping("LDAP_ROLE_GROUPS")
