"""Malformed settings stop start-up with a message naming the variable; good ones take effect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def run_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY"}}
    clean.update({"VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "appliance.settings", **env})
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "mysql://root@localhost/x"),
        ("DATABASE_URL", "not a url"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("REDIS_URL", "redis://127.0.0.1:notaport/0"),
        ("NODE_NAME", "box one/with slash"),
        ("ALLOWED_HOSTS", "a.example,,b.example"),
        ("DEBUG", "maybe"),
        ("WORKER_HEARTBEAT_SECONDS", "fast"),
        ("LOGIN_FAILURE_LIMIT", "0"),
        ("LOG_LEVEL", "LOUD"),
        ("DATA_DIR", "relative/path"),
        ("SECRET_KEY", "short"),
        ("CURRENCY", "dollars"),
        ("CURRENCY", "usd"),
        ("LDAP_SERVER_URI", "http://directory.example"),
        ("LDAP_GROUP_TYPE", "ldapGroup"),
        ("LDAP_ROLE_GROUPS", "cn=ml-admins,dc=example,dc=org => root"),
        ("LDAP_ROLE_GROUPS", "cn=ml-admins,dc=example,dc=org"),
        ("LDAP_DEPARTMENT_GROUPS", "cn=finance,dc=example,dc=org => Finance:owner"),
        ("OIDC_ISSUER", "ftp://sso.example.org"),
        ("OIDC_ISSUER", "http://sso.example.org/realms/console"),  # tokens in clear over the network
        ("OIDC_ISSUER", "https://sso.example.org:port/"),
        ("OIDC_ISSUER", "https://sso.example.org/?realm=x"),
        ("OIDC_ISSUER", "https://sso.example.org"),  # without OIDC_CLIENT_ID (and secret)
        ("OIDC_ROLE_GROUPS", "ml-admins => root"),
        ("OIDC_ROLE_GROUPS", "ml-admins"),
        ("OIDC_DEPARTMENT_GROUPS", "finance => Finance"),
        ("OIDC_TIMEOUT_SECONDS", "0"),
    ],
)
def test_malformed_setting_stops_start_up_naming_it(tmp_path: Path, name: str, value: str) -> None:
    result = run_check(tmp_path, **{name: value})
    assert result.returncode == 2, result.stderr
    assert name in result.stderr
    assert "Traceback" not in result.stderr
    if name == "SECRET_KEY":
        assert value not in result.stderr


OIDC = {"OIDC_ISSUER": "https://sso.example.org/realms/console", "OIDC_CLIENT_ID": "console",
        "OIDC_CLIENT_SECRET": "s3cret"}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("OIDC_CLIENT_ID", "", "OIDC_CLIENT_ID is missing"),
        ("OIDC_CLIENT_SECRET", "", "OIDC_CLIENT_SECRET is missing"),
        ("OIDC_SCOPES", "profile email", "OIDC_SCOPES"),
    ],
)
def test_an_incomplete_oidc_setting_stops_start_up_naming_it(tmp_path: Path, name: str, value: str, said: str) -> None:
    result = run_check(tmp_path, **{**OIDC, name: value})
    assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "s3cret" not in result.stderr


def test_good_settings_start(tmp_path: Path) -> None:
    result = run_check(tmp_path, NODE_NAME="gpu-box-1", ALLOWED_HOSTS="console.lan,127.0.0.1", DEBUG="no")
    assert result.returncode == 0, result.stderr
    result = run_check(tmp_path, **OIDC, OIDC_ROLE_GROUPS="ml-admins => appliance_admin",
                       OIDC_DEPARTMENT_GROUPS="finance => Finance:viewer")  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_secret_key_generated_once_into_var(tmp_path: Path) -> None:
    assert run_check(tmp_path).returncode == 0
    key_file = tmp_path / "secret_key"
    first = key_file.read_text()
    assert len(first) >= 32
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert run_check(tmp_path).returncode == 0
    assert key_file.read_text() == first


def test_secret_key_is_not_in_the_code() -> None:
    for path in (ROOT / "appliance").rglob("*.py"):
        assert settings.SECRET_KEY not in path.read_text()


@pytest.mark.django_db
def test_database_is_configured_for_several_processes() -> None:
    if connection.vendor == "sqlite":
        # WAL: the web server and the workers read while one of them writes.
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode")
            assert cursor.fetchone()[0] == "wal"
        assert connection.settings_dict["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    else:
        assert connection.vendor == "postgresql"
        assert connection.settings_dict["CONN_HEALTH_CHECKS"] is True


def test_node_queue_and_celery_config() -> None:
    from appliance.celery import app

    assert settings.NODE_NAME.startswith("testnode-")  # per checkout: tests/runs.py
    assert {q.name for q in app.conf.task_queues} == {"default", f"node.{settings.NODE_NAME}"}
    assert app.conf.accept_content == ["json"]
    assert app.conf.worker_prefetch_multiplier == 1
    assert "recover-stale-jobs" in app.conf.beat_schedule
