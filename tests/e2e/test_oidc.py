"""OpenID Connect sign-in in a real browser (Debian's Chromium through Playwright): the console's web
process (uvicorn, as ``make run`` serves it) with OIDC_* settings pointing at the FAKE provider of
tests/appliance/oidc_provider.py, a real HTTP server in its own process. The browser goes to the
provider's sign-in form and back; the person lands with the role their groups map to, signs out, and
someone in no mapped group is refused. Screenshots of each step in English and Chinese are in
var/screenshots/oidc-*.png.

Only the web process runs here (no worker, beat or engine): sign-in needs none of them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from playwright.sync_api import expect

from appliance.models import AuditEvent
from tenancy.models import Department
from tests.appliance.oidc_provider import CLIENT_ID, CLIENT_SECRET, FakeOidcProvider
from tests.e2e.conftest import fresh_page, in_chinese, shot
from tests.e2e.stack import Console, stack_env

pytestmark = pytest.mark.e2e


class OidcConsole(Console):
    """The console's web process, its log apart from the browser suite's main console."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env)
        self.log = Path(settings.VAR_DIR) / "e2e-oidc-web.log"


@pytest.fixture(scope="module")
def oidc_console(e2e_db: None) -> Iterator[tuple[OidcConsole, FakeOidcProvider]]:
    provider = FakeOidcProvider().start()
    data_dir = Path(settings.VAR_DIR) / "e2e-oidc-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    env = stack_env(data_dir)
    env.update(OIDC_ISSUER=provider.issuer, OIDC_CLIENT_ID=CLIENT_ID, OIDC_CLIENT_SECRET=CLIENT_SECRET,
               OIDC_BUTTON_LABEL="Example SSO", OIDC_ROLE_GROUPS="ml-admins => appliance_admin",
               OIDC_DEPARTMENT_GROUPS="finance => Finance:viewer")  # fmt: skip
    console = OidcConsole(env)
    provider.allow_redirect(f"{console.url}/login/oidc/callback")  # as an admin registers it at the provider
    Department.objects.get_or_create(name="Finance")
    try:
        console.start()
        yield console, provider
    finally:
        console.stop()
        provider.stop()


@pytest.fixture
def oidc_page(chromium: Any, oidc_console: tuple[OidcConsole, FakeOidcProvider]) -> Iterator[Any]:
    with fresh_page(chromium) as opened:
        yield opened


def sign_in_at_provider(page: Any, console: OidcConsole, username: str,
                        button: str = "Sign in with Example SSO") -> None:  # fmt: skip
    """From the console's sign-in page, through the provider's sign-in form, back to the console."""
    page.goto(console.url + "/login/")
    page.get_by_role("link", name=button).click()
    expect(page.locator("h1")).to_have_text("Sign in to the FAKE provider")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(f"{username}-pw")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: url.startswith(console.url))


def test_sign_in_with_the_provider_lands_with_the_mapped_role_and_signs_out(
    oidc_page: Any, oidc_console: tuple[OidcConsole, FakeOidcProvider]
) -> None:
    """Olga is in the provider's ml-admins group: she signs in there, is an appliance admin here, tests
    the provider on the Directory sign-in page (in English and Chinese) and signs out."""
    page, (console, provider) = oidc_page, oidc_console
    page.goto(console.url + "/login/")
    expect(page.get_by_role("link", name="Sign in with Example SSO")).to_be_visible()
    shot(page, "oidc-login")
    sign_in_at_provider(page, console, "olga")
    expect(page.locator(".user-menu summary")).to_contain_text("olga · Appliance admin")
    assert "/login/" not in page.url
    shot(page, "oidc-signed-in")
    assert AuditEvent.objects.filter(action="auth.directory_login", actor_name="olga", detail__via="oidc").exists()

    page.goto(console.url + "/settings/directory/")
    panel = page.locator("section", has=page.locator("#oidc-settings"))
    expect(panel).to_contain_text(provider.issuer)
    expect(panel).to_contain_text(f"{console.url}/login/oidc/callback")
    expect(panel).not_to_contain_text(CLIENT_SECRET)
    page.get_by_role("button", name="Test OpenID Connect").click()
    expect(page.locator(".messages")).to_contain_text("Discovery document and signing keys read; 1 key found.")
    shot(page, "oidc-directory")
    with in_chinese(page):
        expect(page.locator("#oidc-settings")).to_contain_text("OpenID Connect")
        page.get_by_role("button", name="测试 OpenID Connect").click()
        expect(page.locator(".messages")).to_contain_text("已读取发现文档和签名密钥；找到 1 个密钥。")
        shot(page, "oidc-directory-zh")

    page.locator(".user-menu summary").click()
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(lambda url: "/login/" in url)
    page.goto(console.url + "/settings/users/")
    assert "/login/" in page.url  # signed out: the admin page asks for a sign-in again


def test_a_department_group_gives_a_department_role_and_no_mapped_group_is_refused(
    chromium: Any, oidc_console: tuple[OidcConsole, FakeOidcProvider]
) -> None:
    """Farid (finance) is a department viewer of Finance; Norm, in no mapped group, is told so on the
    sign-in page, in English and in Chinese (a browser that asks for Chinese)."""
    console, _provider = oidc_console
    with fresh_page(chromium) as page:
        sign_in_at_provider(page, console, "farid")
        expect(page.locator(".user-menu summary")).to_contain_text("farid · Department viewer")
    with fresh_page(chromium) as page:
        sign_in_at_provider(page, console, "norm")
        expect(page.locator(".messages")).to_contain_text("in no group that this console maps to a role")
        expect(page.locator(".user-menu")).to_have_count(0)
        shot(page, "oidc-refused")
    with fresh_page(chromium, locale="zh-CN") as page:
        sign_in_at_provider(page, console, "norm", button="通过 Example SSO 登录")
        expect(page.locator(".messages")).to_contain_text("您的目录账户不在本控制台映射到任何角色的组中")
        shot(page, "oidc-refused-zh")
