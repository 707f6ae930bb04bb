"""/healthz: database, Redis and worker liveness as JSON."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

from appliance.worker import beat_once, redis_client

pytestmark = pytest.mark.django_db


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_all_up_when_a_worker_beats(client: Client) -> None:
    beat_once(redis_client(), f"worker@{settings.NODE_NAME}")
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True
    assert body["database"]["ok"] and body["redis"]["ok"]
    assert body["worker"] == {
        "ok": True,
        "workers": [f"worker@{settings.NODE_NAME}"],
        "nodes": [settings.NODE_NAME],
        "this_node": True,
    }


def test_no_worker_is_503_and_says_so(client: Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["database"]["ok"] and body["redis"]["ok"]
    assert body["worker"]["ok"] is False
    assert "heartbeat" in body["worker"]["error"]


def test_redis_unreachable_is_503_naming_redis(client: Client, settings: Any) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["redis"]["ok"] is False
    assert "Connection" in body["redis"]["error"]
    assert body["database"]["ok"] is True


def test_heartbeat_expires(redis_db: Any, settings: Any) -> None:
    settings.WORKER_HEARTBEAT_SECONDS = 1  # three beats, but never under 10 s (a slow beat is not a death)
    beat_once(redis_client(), "worker@x")
    assert 0 < redis_db.ttl("console:worker:worker@x") <= 10
    settings.WORKER_HEARTBEAT_SECONDS = 20
    beat_once(redis_client(), "worker@x")
    assert 30 < redis_db.ttl("console:worker:worker@x") <= 60
