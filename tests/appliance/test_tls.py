"""TLS=on behind a proxy that terminates TLS: secure cookies, HSTS, the proxy's X-Forwarded-Proto trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from tests.appliance.test_settings import ROOT, run_check

_PRINT_SETTINGS = """
import json, django
django.setup()
from django.conf import settings as s
names = ["SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SECURE_HSTS_SECONDS", "SECURE_PROXY_SSL_HEADER",
         "SECURE_SSL_REDIRECT", "LANGUAGE_COOKIE_SECURE"]
print(json.dumps({name: getattr(s, name) for name in names}))
"""


def tls_settings(tmp_path: Path, **env: str) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "TLS"}}
    clean.update({"VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "appliance.settings", **env})
    result = subprocess.run(
        [sys.executable, "-c", _PRINT_SETTINGS], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_tls_on_makes_cookies_secure_and_sends_hsts(tmp_path: Path) -> None:
    assert tls_settings(tmp_path, TLS="on") == {
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
        "SECURE_SSL_REDIRECT": False,
        "LANGUAGE_COOKIE_SECURE": True,
    }
    assert tls_settings(tmp_path, TLS="on", TLS_REDIRECT="yes", HSTS_SECONDS="600")["SECURE_HSTS_SECONDS"] == 600
    off = tls_settings(tmp_path)
    assert off["SESSION_COOKIE_SECURE"] is False and off["SECURE_HSTS_SECONDS"] == 0
    assert off["SECURE_PROXY_SSL_HEADER"] is None


@pytest.mark.parametrize(("name", "value"), [("TLS", "maybe"), ("HSTS_SECONDS", "a year"), ("TLS_REDIRECT", "sure")])
def test_malformed_tls_settings_stop_start_up_naming_them(tmp_path: Path, name: str, value: str) -> None:
    result = run_check(tmp_path, **{"TLS": "on", name: value})
    assert result.returncode == 2, result.stderr
    assert f"Setting {name}=" in result.stderr and "Traceback" not in result.stderr


def test_behind_the_proxy_the_session_cookie_is_secure_and_hsts_is_sent(settings: Any, admin_user: Any) -> None:
    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_HSTS_SECONDS = 31536000
    client = Client(HTTP_X_FORWARDED_PROTO="https")
    response = client.post(reverse("login"), {"username": "alice", "password": "pw-alice"})
    assert response.status_code == 302
    assert response.cookies["sessionid"]["secure"] and response.cookies["sessionid"]["httponly"]
    assert response["Strict-Transport-Security"] == "max-age=31536000"
    # Without the proxy's header the request is plain HTTP: no HSTS (browsers ignore it there anyway).
    assert "Strict-Transport-Security" not in Client().get(reverse("login"))
