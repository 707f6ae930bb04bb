"""Management commands: the first admin and Redis (used by `make run`), and set_role (break glass)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from appliance.management.commands.ensure_redis import answers, private_server_command
from appliance.models import AuditEvent, Profile
from appliance.roles import Role, role_of
from tests.appliance.test_health import free_port
from tests.conftest import make_user
from tests.workers import wait_for

pytestmark = pytest.mark.django_db


def test_first_admin_created_once_with_password_printed_once() -> None:
    out = io.StringIO()
    call_command("ensure_admin", stdout=out)
    text = out.getvalue()
    assert "Password:" in text
    password = text.split("Password:")[1].split()[0]
    client = Client()
    assert client.post(reverse("login"), {"username": "admin", "password": password}).status_code == 302
    again = io.StringIO()
    call_command("ensure_admin", stdout=again)
    assert "exists already" in again.getvalue()
    assert password not in again.getvalue()
    assert get_user_model().objects.count() == 1


def test_ensure_redis_when_redis_answers() -> None:
    out, err = io.StringIO(), io.StringIO()
    call_command("ensure_redis", stdout=out, stderr=err)
    assert "Redis answers" in out.getvalue()
    persistent = redis.Redis.from_url(settings.REDIS_URL).config_get("appendonly")["appendonly"] == "yes"
    assert ("keeps no append-only file" in err.getvalue()) is not persistent  # warned when usage could be lost


def test_ensure_redis_without_redis_server_says_how_to_install(settings: Any, monkeypatch: Any) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CommandError, match="apt-get install redis-server"):
        call_command("ensure_redis")


def test_ensure_redis_refuses_to_start_a_remote_one(settings: Any) -> None:
    settings.REDIS_URL = "redis://192.0.2.1:6379/0"
    with pytest.raises(CommandError, match="REDIS_URL"):
        call_command("ensure_redis")


def test_ensure_redis_starts_a_private_server(settings: Any, tmp_path: Path) -> None:
    port = free_port()
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    settings.VAR_DIR = tmp_path
    out = io.StringIO()
    try:
        call_command("ensure_redis", stdout=out)
        assert "Started a private Redis" in out.getvalue()
        assert answers(settings.REDIS_URL)
        pid = int((tmp_path / "redis" / "redis.pid").read_text())
        # A crash (SIGKILL) and a restart keep what was written: an undrained usage entry survives.
        redis.Redis(port=port).xadd("usage:stream", {"ct": "8"})
        time.sleep(1.5)  # appendfsync everysec
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not answers(settings.REDIS_URL), timeout=10)
        call_command("ensure_redis", stdout=out)
        assert redis.Redis(port=port).xlen("usage:stream") == 1
    finally:
        try:
            redis.Redis(port=port).shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # shutdown closes the connection it came on


def test_private_server_command_is_loopback_only() -> None:
    command = private_server_command(6390, "/tmp/x")
    assert command[command.index("--bind") + 1] == "127.0.0.1"
    assert subprocess.list2cmdline(command).startswith("redis-server --port 6390")


def test_set_role_gives_a_role_and_restores_a_demoted_admin() -> None:
    make_user("root", Role.APPLIANCE_ADMIN)
    bob = make_user("bob", Role.VIEWER, is_active=False)
    out = io.StringIO()
    call_command("set_role", "bob", "operator", stdout=out)
    bob.refresh_from_db()
    assert role_of(bob) is None and Profile.objects.get(user=bob).role == Role.OPERATOR  # still deactivated
    assert "operator" in out.getvalue().lower() and "--activate" in out.getvalue()
    call_command("set_role", "bob", "appliance_admin", "--activate", stdout=io.StringIO())
    bob = get_user_model().objects.get(pk=bob.pk)
    assert bob.is_active and role_of(bob) == Role.APPLIANCE_ADMIN
    event = AuditEvent.objects.filter(action="user.set_role", target_id=str(bob.pk)).latest("pk")
    assert event.detail["role"] == "appliance_admin" and event.detail["via"] == "manage.py set_role"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["nobody", "viewer"], "No user named 'nobody'"),
        (["root", "emperor"], "Unknown role 'emperor'"),
        (["root", "viewer"], "last active appliance admin"),
    ],
)
def test_set_role_refuses_clearly_and_exits_non_zero(arguments: list[str], message: str) -> None:
    root = make_user("root", Role.APPLIANCE_ADMIN)
    with pytest.raises(CommandError, match=message) as refused:
        call_command("set_role", *arguments, stdout=io.StringIO())
    assert refused.value.returncode != 0  # manage.py exits with it
    assert role_of(get_user_model().objects.get(pk=root.pk)) == Role.APPLIANCE_ADMIN
