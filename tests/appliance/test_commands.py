"""Management commands used by `make run`: the first admin and Redis."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from appliance.management.commands.ensure_redis import answers, private_server_command
from tests.appliance.test_health import free_port

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
    out = io.StringIO()
    call_command("ensure_redis", stdout=out)
    assert "Redis answers" in out.getvalue()


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
        assert (tmp_path / "redis" / "redis.pid").exists()
    finally:
        try:
            redis.Redis(port=port).shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # shutdown closes the connection it came on


def test_private_server_command_is_loopback_only() -> None:
    command = private_server_command(6390, "/tmp/x")
    assert command[command.index("--bind") + 1] == "127.0.0.1"
    assert subprocess.list2cmdline(command).startswith("redis-server --port 6390")
