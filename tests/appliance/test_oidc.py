"""OpenID Connect sign-in against a provider speaking the real protocol over HTTP, in its own process
(tests/appliance/oidc_provider.py): the authorization code flow with PKCE through the sign-in page,
group → role and group → department mappings at every sign-in, removal from a group, and each bad
input a clear error that signs nobody in: a provider that does not answer, a replayed or forged
callback, a wrong client secret, ID tokens with a bad signature, another audience, nonce or issuer,
a local account of the same name; the Settings page and its connection test (page and API)."""

from __future__ import annotations

import html
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from appliance.models import AuditEvent, Profile
from appliance.roles import Role, role_of
from tenancy.models import Department, Membership
from tests.appliance.oidc_provider import CLIENT_ID, CLIENT_SECRET, USERS, FakeOidcProvider

CALLBACK = "http://testserver/login/oidc/callback"


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeOidcProvider]:
    server = FakeOidcProvider().start()
    server.allow_redirect(CALLBACK)
    yield server
    server.stop()


@pytest.fixture
def oidc(settings: Any, provider: FakeOidcProvider, db: None) -> Iterator[FakeOidcProvider]:
    settings.OIDC_ISSUER = provider.issuer
    settings.OIDC_CLIENT_ID, settings.OIDC_CLIENT_SECRET = CLIENT_ID, CLIENT_SECRET
    settings.OIDC_BUTTON_LABEL = "Example SSO"
    settings.OIDC_ROLE_GROUPS = [("ML-Admins", "appliance_admin")]  # group names compare without case
    settings.OIDC_DEPARTMENT_GROUPS = [("finance", "Finance:viewer"), ("legal-leads", "Legal:admin")]
    Department.objects.create(name="Finance")
    Department.objects.create(name="Legal")
    provider.misbehave("")
    yield provider
    provider.misbehave("")
    for name, (_password, groups, _email) in USERS.items():
        provider.set_groups(name, groups)


def at_provider(start: Any, username: str, password: str) -> str:
    """What a browser does at the provider: open the authorize URL the console sent it to, fill in the
    sign-in form, and follow the answer back; the callback URL (path and query) it is sent to."""
    assert start.status_code == 302, start.content.decode()[:2000]
    url = start["Location"]
    query = {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}
    assert query["code_challenge_method"] == "S256" and query["code_challenge"] and query["nonce"]
    with httpx.Client(timeout=10) as browser:
        form = browser.get(url)
        assert form.status_code == 200 and "Sign in to the FAKE provider" in form.text, form.text
        answer = browser.post(url.split("?")[0], data={**query, "username": username, "password": password})
    assert answer.status_code == 302, answer.text
    back = urlsplit(answer.headers["location"])
    assert f"{back.scheme}://{back.netloc}{back.path}" == CALLBACK
    return f"{back.path}?{back.query}"


def sign_in(client: Any, username: str, password: str = "") -> Any:
    callback = at_provider(client.get(reverse("oidc-login")), username, password or f"{username}-pw")
    return client.get(callback)


def user(username: str) -> Any:
    return get_user_model().objects.select_related("profile").get(username=username)


def error_shown(client: Any, response: Any) -> str:
    assert response.status_code == 302 and response["Location"] == reverse("login"), response
    page = html.unescape(client.get(reverse("login")).content.decode())
    assert "_auth_user_id" not in client.session
    return page


def test_the_sign_in_page_offers_the_provider_and_an_admin_signs_in_with_the_mapped_role(
    client: Any, oidc: FakeOidcProvider
) -> None:
    assert "Sign in with Example SSO" in client.get(reverse("login")).content.decode()
    response = sign_in(client, "alice")
    assert response.status_code == 302 and response["Location"] == reverse("dashboard:overview")
    alice = user("alice")
    assert role_of(alice) == Role.APPLIANCE_ADMIN and alice.profile.source == Profile.Source.OIDC
    assert alice.profile.subject == f"{oidc.issuer} sub-alice"
    assert alice.email == "alice@example.org" and not alice.has_usable_password()
    assert client.get(reverse("users")).status_code == 200  # an admin's page
    event = AuditEvent.objects.get(action="auth.directory_login", actor=alice)
    assert event.detail == {"groups": ["ML-Admins"], "role": "appliance_admin", "via": "oidc"}
    assert AuditEvent.objects.filter(action="auth.directory_mapping", actor=alice, detail__via="oidc").exists()
    client.post(reverse("logout"))
    assert client.get(reverse("users")).status_code == 302  # signed out


def test_next_is_kept_through_the_provider(client: Any, oidc: FakeOidcProvider) -> None:
    start = client.get(reverse("oidc-login") + "?next=/settings/users/")
    assert client.get(at_provider(start, "alice", "alice-pw"))["Location"] == "/settings/users/"
    client.logout()
    start = client.get(reverse("oidc-login") + "?next=https://evil.example/")  # never off the console
    assert client.get(at_provider(start, "alice", "alice-pw"))["Location"] == reverse("dashboard:overview")


def test_department_groups_give_memberships_and_removal_takes_them_away(client: Any, oidc: FakeOidcProvider) -> None:
    assert sign_in(client, "fiona").status_code == 302
    fiona = user("fiona")
    assert role_of(fiona) == Role.DEPARTMENT_VIEWER
    assert dict(Membership.objects.filter(user=fiona).values_list("department__name", "role")) == {"Finance": "viewer"}
    client.logout()
    oidc.set_groups("fiona", ["finance", "legal-leads"])  # now also a Legal lead: department admin
    assert sign_in(client, "fiona").status_code == 302
    assert role_of(user("fiona")) == Role.DEPARTMENT_ADMIN
    assert dict(Membership.objects.filter(user=fiona).values_list("department__name", "role")) == {
        "Finance": "viewer", "Legal": "department_admin"}  # fmt: skip
    client.logout()
    oidc.set_groups("fiona", ["finance"])  # removed from the group: removed from Legal at the next sign-in
    assert sign_in(client, "fiona").status_code == 302
    assert dict(Membership.objects.filter(user=fiona).values_list("department__name", "role")) == {"Finance": "viewer"}
    change = AuditEvent.objects.filter(action="auth.directory_mapping", actor=fiona).order_by("-pk").first()
    assert change.detail["removed"] == ["Legal"] and change.detail["role"] == "department_viewer"
    client.logout()
    oidc.set_groups("fiona", ["staff"])  # in no mapped group: refused, account deactivated
    page = error_shown(client, sign_in(client, "fiona"))
    assert "in no group that this console maps" in page
    assert not user("fiona").is_active
    oidc.set_groups("fiona", ["finance"])
    assert sign_in(client, "fiona").status_code == 302  # back in the group: back in
    assert user("fiona").is_active


def test_in_no_mapped_group_is_refused(client: Any, oidc: FakeOidcProvider) -> None:
    page = error_shown(client, sign_in(client, "nobody"))
    assert "in no group that this console maps" in page
    assert not user("nobody").is_active
    assert AuditEvent.objects.filter(action="auth.directory_mapping", outcome="denied", detail__via="oidc").exists()
    assert AuditEvent.objects.filter(action="auth.directory_login", outcome="failed",
                                     detail__reason="in no mapped group").exists()  # fmt: skip


def test_a_replayed_or_forged_callback_signs_nobody_in(client: Any, oidc: FakeOidcProvider) -> None:
    callback = at_provider(client.get(reverse("oidc-login")), "alice", "alice-pw")
    assert client.get(callback).status_code == 302 and "_auth_user_id" in client.session
    client.logout()
    page = error_shown(client, client.get(callback))  # the same answer again: its state was used
    assert "already used or does not belong to this browser" in page

    other = type(client)()  # a browser that never started a sign-in is sent someone else's answer
    callback = at_provider(client.get(reverse("oidc-login")), "alice", "alice-pw")
    assert "already used or does not belong to this browser" in error_shown(other, other.get(callback))
    code = parse_qs(urlsplit(callback).query)["code"][0]
    assert "has no state" in error_shown(client, client.get(f"{reverse('oidc-callback')}?code={code}"))
    assert AuditEvent.objects.filter(action="auth.directory_login", outcome="failed",
                                     detail__reason="state mismatch or replayed callback").exists()  # fmt: skip


def test_the_provider_saying_no_is_shown(client: Any, oidc: FakeOidcProvider) -> None:
    client.get(reverse("oidc-login"))
    response = client.get(reverse("oidc-callback") + "?error=access_denied&error_description=User+cancelled&state=x")
    assert "did not sign you in: User cancelled" in error_shown(client, response)


def test_a_wrong_client_secret_is_a_clear_error(client: Any, oidc: FakeOidcProvider, settings: Any) -> None:
    settings.OIDC_CLIENT_SECRET = "not-the-secret"
    page = error_shown(client, sign_in(client, "alice"))
    assert "refused the console's client credentials" in page and "not-the-secret" not in page
    assert not get_user_model().objects.filter(username="alice").exists()


@pytest.mark.parametrize(
    ("mode", "shown"),
    [
        ("bad-signature", "bad_signature"),
        ("wrong-audience", "Invalid claim: 'aud'"),
        ("wrong-nonce", "Invalid claim: 'nonce'"),
        ("wrong-issuer", "Invalid claim: 'iss'"),
    ],
)
def test_an_id_token_that_does_not_verify_signs_nobody_in(client: Any, oidc: FakeOidcProvider, mode: str,
                                                          shown: str) -> None:  # fmt: skip
    oidc.misbehave(mode)
    page = error_shown(client, sign_in(client, "alice"))
    assert f"ID token did not verify ({shown})" in page, page[page.find("messages") :][:600]
    assert not get_user_model().objects.filter(username="alice").exists()
    assert AuditEvent.objects.filter(action="auth.directory_login", outcome="failed",
                                     detail__reason__startswith="id token refused").exists()  # fmt: skip


def test_userinfo_about_someone_else_signs_nobody_in(client: Any, oidc: FakeOidcProvider) -> None:
    oidc.misbehave("userinfo-other-sub")  # the groups come from userinfo: they must be the ID token's person's
    assert "user details are about someone else" in error_shown(client, sign_in(client, "alice"))
    assert not get_user_model().objects.filter(username="alice").exists()


def test_provider_down_is_a_clear_error_and_local_admin_still_signs_in(
    client: Any, oidc: FakeOidcProvider, settings: Any, admin_user: Any
) -> None:
    settings.OIDC_ISSUER = "http://127.0.0.1:1"  # nothing listens there
    page = error_shown(client, client.get(reverse("oidc-login")))
    assert "The identity provider did not answer" in page and "Local accounts still can" in page
    admin_user.set_password("local-break-glass-pw")
    admin_user.save()
    response = client.post(reverse("login"), {"username": admin_user.username, "password": "local-break-glass-pw"})
    assert response.status_code == 302


def test_a_provider_going_down_mid_sign_in_is_a_clear_error(client: Any, oidc: FakeOidcProvider,
                                                            settings: Any) -> None:  # fmt: skip
    callback = at_provider(client.get(reverse("oidc-login")), "alice", "alice-pw")
    settings.OIDC_ISSUER = "http://127.0.0.1:1"
    assert "The identity provider did not answer" in error_shown(client, client.get(callback))


def test_a_local_account_is_never_taken_over(client: Any, oidc: FakeOidcProvider) -> None:
    local, _password = Profile.create_user("lee", Role.VIEWER, "lee@local")
    page = error_shown(client, sign_in(client, "lee"))  # the provider's lee is in ml-admins
    assert "An account named lee exists in the console" in page
    assert user("lee").profile.source == Profile.Source.LOCAL and role_of(user("lee")) == Role.VIEWER
    assert not Membership.objects.filter(user=local).exists()


def test_another_subject_with_the_same_user_name_is_refused(client: Any, oidc: FakeOidcProvider) -> None:
    assert sign_in(client, "alice").status_code == 302
    client.logout()
    Profile.objects.filter(user=user("alice")).update(subject=f"{oidc.issuer} sub-someone-before-alice")
    assert "An account named alice exists" in error_shown(client, sign_in(client, "alice"))


def test_settings_page_masks_the_secret_and_tests_the_connection(admin_client: Any, oidc: FakeOidcProvider,
                                                                 settings: Any) -> None:  # fmt: skip
    page = admin_client.get(reverse("directory")).content.decode()
    assert oidc.issuer in page and CLIENT_ID in page and CLIENT_SECRET not in page and "••••" in page
    assert CALLBACK in page and "ML-Admins" in page and "Finance — Viewer" in page and "Appliance admin" in page
    result = admin_client.post(reverse("directory-oidc-test"), follow=True).content.decode()
    assert "Discovery document and signing keys read; 1 key found." in result
    api = admin_client.post("/api/v1/directory/oidc/test").json()
    assert api["ok"] and api["keys"] == 1
    shown = admin_client.get("/api/v1/directory/oidc").json()
    assert shown["enabled"] and shown["settings"]["OIDC_CLIENT_SECRET"] == "••••••••"
    assert shown["role_groups"] == [["ML-Admins", "appliance_admin"]]
    settings.OIDC_ISSUER = "http://127.0.0.1:1"
    failed = admin_client.post("/api/v1/directory/oidc/test").json()
    assert not failed["ok"] and "did not answer" in failed["message"]
    assert AuditEvent.objects.filter(action="directory.oidc_test", outcome="failed").exists()
    assert CLIENT_SECRET not in str(list(AuditEvent.objects.values_list("detail", flat=True)))


def test_oidc_off_by_default(admin_client: Any) -> None:
    anonymous = type(admin_client)()
    assert "Sign in with" not in anonymous.get(reverse("login")).content.decode()
    assert "OpenID Connect sign-in is off" in error_shown(anonymous, anonymous.get(reverse("oidc-login")))
    assert "OIDC_ISSUER is not set" in admin_client.post("/api/v1/directory/oidc/test").json()["message"]
    assert "Off: set OIDC_ISSUER" in admin_client.get(reverse("directory")).content.decode()
