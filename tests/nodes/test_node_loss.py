"""A node that stops reporting: its replicas are lost at once (the gateway's directory no longer
routes to them), and when the node reports again its reconcile pass adopts a live engine without a
second one, or starts the engine anew if it died meanwhile. With the FAKE engine (fast)."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

from gateway.directory import _load_routes
from nodes import registry
from nodes.models import Node
from provisioning.models import Replica
from provisioning.reconcile import reconcile
from tests.provisioning.test_reconcile import deploy, ours, until

pytestmark = pytest.mark.django_db


def route(name: str) -> Any:
    """The gateway's route for ``name`` as its directory loads it (its connection left open: the test's)."""
    with mock.patch("gateway.directory.close_old_connections"):
        return _load_routes()[name]


def lose_this_node() -> list[str]:
    registry.heartbeat(settings.NODE_NAME)
    Node.objects.filter(name=settings.NODE_NAME).update(last_heartbeat=timezone.now() - timedelta(minutes=5))
    return registry.sweep()


def test_a_lost_node_s_replicas_leave_the_gateway_and_are_adopted_when_it_is_back(
    admin_client: Client, tiny_model: Any, fake_runtime: Any, no_kick: Any, cleanup: Any
) -> None:
    assert deploy(admin_client, tiny_model, fake_runtime).status_code == 302
    replica = until("ready")
    assert [r.pk for r in route("chat").replicas] == [replica.pk]

    assert lose_this_node() == [settings.NODE_NAME]
    lost = Replica.objects.get(pk=replica.pk)
    assert lost.state == "lost" and f"The node {settings.NODE_NAME} stopped reporting" in lost.last_error
    assert route("chat").replicas == ()  # nothing is sent to it any more
    page = admin_client.get("/deployments/").content.decode()
    assert 'data-state="lost">Lost</span>' in page

    registry.heartbeat(settings.NODE_NAME)  # the node is back, its engine still running
    adopted = until("ready")
    assert adopted.pid == replica.pid and list(ours()) == [replica.pid]  # adopted, not started twice
    assert [r.pk for r in route("chat").replicas] == [replica.pk]


def test_an_engine_that_died_while_its_node_was_away_is_started_again(
    admin_client: Client, tiny_model: Any, fake_runtime: Any, no_kick: Any, cleanup: Any
) -> None:
    assert deploy(admin_client, tiny_model, fake_runtime).status_code == 302
    replica = until("ready")
    lose_this_node()
    os.killpg(replica.pid, signal.SIGKILL)
    registry.heartbeat(settings.NODE_NAME)
    reconcile()
    assert Replica.objects.get(pk=replica.pk).state in ("crashed", "starting", "ready")
    restarted = until("ready")
    assert restarted.pid != replica.pid and restarted.restart_count == 1
