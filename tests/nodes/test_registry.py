"""The node registry: heartbeats, node loss and return, joining with a one-time token (through the
API and ``manage.py join`` against a live console), and the Nodes page's actions."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from appliance.models import ApiToken, AuditEvent
from nodes import registry
from nodes.models import JoinToken, Node
from nodes.tasks import sweep_nodes

pytestmark = pytest.mark.django_db
CLUSTER_DB = "postgres://console@10.0.0.1:5432/console"


@pytest.fixture
def api(admin_user: Any, client: Client) -> Any:
    _token, raw = ApiToken.issue(admin_user, "nodes")

    def call(method: str, path: str, body: Any = None) -> Any:
        kwargs = {"content_type": "application/json", "data": body} if body is not None else {}
        return getattr(client, method)(f"/api/v1{path}", HTTP_AUTHORIZATION=f"Bearer {raw}", **kwargs)

    return call


@pytest.fixture
def cluster(settings: Any) -> Any:
    settings.CLUSTER_DATABASE_URL = CLUSTER_DB
    settings.CLUSTER_REDIS_URL = "redis://10.0.0.1:6379/0"
    return settings


def test_a_heartbeat_registers_the_box_with_what_it_has(settings: Any) -> None:
    settings.NODE_ADDRESS = "10.0.0.5"
    registry.register_facts(lambda name: {"gpus": 8, "runtimes": ["vllm 0.33.0"]})
    try:
        node = registry.heartbeat("box-a")
    finally:
        registry._fact_providers.pop()
    assert (node.name, node.address, node.gpus, node.state) == ("box-a", "10.0.0.5", 8, "ready")
    assert node.cpus > 0 and node.memory_bytes > 0 and node.disk_free_bytes > 0
    assert (
        node.facts["runtimes"] == ["vllm 0.33.0"]
        and node.facts["memory_available_bytes"] > 0
        and node.version == settings.CONSOLE_VERSION
    )
    first = node.last_heartbeat
    assert registry.heartbeat("box-a").last_heartbeat > first and Node.objects.count() == 1


def test_a_failing_fact_provider_does_not_stop_the_heartbeat() -> None:
    registry.register_facts(lambda name: 1 / 0)
    try:
        assert registry.heartbeat("box-a").state == "ready"
    finally:
        registry._fact_providers.pop()


def test_a_silent_node_becomes_unreachable_once_and_comes_back_with_its_next_heartbeat(settings: Any) -> None:
    settings.NODE_LOST_SECONDS = 20
    lost, back = [], []
    registry.on_node_lost(lambda node: lost.append(node.name))
    registry.on_node_back(lambda node: back.append(node.name))
    try:
        registry.heartbeat("box-a")
        registry.heartbeat("box-b")
        Node.objects.filter(name="box-b").update(last_heartbeat=timezone.now() - timedelta(seconds=21))
        assert registry.sweep() == ["box-b"]
        assert registry.sweep() == []  # once
        assert lost == ["box-b"] and Node.objects.get(name="box-b").state == "unreachable"
        assert Node.objects.get(name="box-a").state == "ready"
        registry.heartbeat("box-b")
        assert back == ["box-b"] and Node.objects.get(name="box-b").state == "ready"
    finally:
        registry._lost_hooks.pop()
        registry._back_hooks.pop()


def test_joining_with_a_token_answers_the_shared_settings_once(api: Any, cluster: Any, client: Client) -> None:
    made = api("post", "/nodes/join-tokens", {})
    assert made.status_code == 201
    raw = made.json()["token"]
    body = {"token": raw, "name": "box-b", "address": "10.0.0.2", "cpus": 64, "gpus": 8}
    joined = client.post("/api/v1/nodes/join", body, content_type="application/json")
    assert joined.status_code == 200, joined.content
    assert joined.json() == {"DATABASE_URL": CLUSTER_DB, "REDIS_URL": "redis://10.0.0.1:6379/0",
                             "SECRET_KEY": cluster.SECRET_KEY, "NODE_NAME": "box-b"}  # fmt: skip
    node = Node.objects.get(name="box-b")
    assert (node.address, node.cpus, node.gpus, node.state) == ("10.0.0.2", 64, 8, "ready")
    assert JoinToken.objects.get().used_by == "box-b"
    again = client.post("/api/v1/nodes/join", body | {"name": "box-c"}, content_type="application/json")
    assert again.status_code == 401 and "used already" in again.json()["detail"]
    assert not Node.objects.filter(name="box-c").exists()
    assert AuditEvent.objects.filter(action="node.join", outcome="denied").count() == 1


@pytest.mark.parametrize(
    ("case", "status", "text"),
    [("expired", 401, "expired"), ("garbage", 401, "not a join token"), ("sqlite", 409, "PostgreSQL"),
     ("alive", 409, "is in the cluster and alive"), ("bad name", 422, ""), ("bad address", 422, ""),
     ("unknown, on sqlite", 401, "unknown")],
)  # fmt: skip
def test_joins_the_console_refuses(cluster: Any, client: Client, case: str, status: int, text: str) -> None:
    token, raw = JoinToken.issue(hours=1)
    body: dict[str, Any] = {"token": raw, "name": "box-b", "address": "10.0.0.2"}
    if case == "expired":
        JoinToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    elif case == "garbage":
        body["token"] = "sk-apc-not-a-join-token"
    elif case == "sqlite":
        cluster.CLUSTER_DATABASE_URL = "sqlite:///var/console.sqlite3"
    elif case == "alive":
        registry.heartbeat("box-b")
    elif case == "bad name":
        body["name"] = "box b; rm -rf /"
    elif case == "bad address":
        body["address"] = "10.0.0.2/evil"
    elif case == "unknown, on sqlite":  # how the console is set up is told to a valid token only
        body["token"] = "join_" + "x" * 43
        cluster.CLUSTER_DATABASE_URL = "sqlite:///var/console.sqlite3"
    response = client.post("/api/v1/nodes/join", body, content_type="application/json")
    assert response.status_code == status and text in response.content.decode()
    assert JoinToken.objects.get().used_at is None  # not used up by a refused join
    assert Node.objects.filter(name="box-b").count() == (1 if case == "alive" else 0)


def test_manage_py_join_writes_the_settings_for_make_node(live_server: Any, cluster: Any, tmp_path: Path) -> None:
    _token, raw = JoinToken.issue()
    env = tmp_path / "node.env"
    call_command("join", console=live_server.url, token=raw, name="box-b", address="10.0.0.2", env_file=str(env))
    text = env.read_text()
    assert f"DATABASE_URL='{CLUSTER_DB}'" in text and "NODE_NAME='box-b'" in text and "NODE_ADDRESS='10.0.0.2'" in text
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    with pytest.raises(CommandError, match="refused the join \\(401\\)"):
        call_command("join", console=live_server.url, token=raw, name="box-c", env_file=str(tmp_path / "c.env"))
    assert not (tmp_path / "c.env").exists()
    with pytest.raises(CommandError, match="could not be reached"):
        call_command("join", console="http://127.0.0.1:9", token=raw, env_file=str(tmp_path / "d.env"))


def test_the_nodes_page_drains_resumes_and_forgets(admin_client: Client) -> None:
    registry.heartbeat("box-a")
    node = registry.heartbeat("box-b")
    page = admin_client.get(reverse("nodes:list")).content.decode()
    assert "box-a" in page and 'data-confirm="Drain box-b?' in page
    response = admin_client.post(reverse("nodes:act", args=[node.pk, "drain"]), follow=True)
    assert "box-b is draining: it gets no new replicas, and replicas placed on any box" in response.content.decode()
    node.refresh_from_db()
    assert node.draining and not node.accepts_new_replicas and node.display_state == "Draining"
    admin_client.post(reverse("nodes:act", args=[node.pk, "resume"]))
    node.refresh_from_db()
    assert not node.draining
    response = admin_client.post(reverse("nodes:act", args=[node.pk, "forget"]), follow=True)
    assert "box-b is alive" in response.content.decode() and Node.objects.filter(name="box-b").exists()
    Node.objects.filter(pk=node.pk).update(state="unreachable")
    admin_client.post(reverse("nodes:act", args=[node.pk, "forget"]))
    assert not Node.objects.filter(name="box-b").exists()
    assert list(AuditEvent.objects.filter(action__startswith="node.").values_list("action", flat=True)
                .order_by("pk")) == ["node.drain", "node.resume", "node.forget"]  # fmt: skip


def test_a_join_token_is_shown_once_with_the_command_to_run(admin_client: Client) -> None:
    response = admin_client.post(reverse("nodes:join-token"), follow=True)
    page = response.content.decode()
    assert "make node CONSOLE=http://testserver TOKEN=join_" in page
    token = JoinToken.objects.get()
    assert token.created_by is not None and token.expires_at > timezone.now()
    again = admin_client.get(reverse("nodes:join-reveal", args=[token.pk])).content.decode()
    assert "TOKEN=join_" not in again and "shown once already" in again
    assert JoinToken.objects.count() == 1


def test_the_sweep_never_marks_the_box_it_runs_on(settings: Any) -> None:
    registry.heartbeat(settings.NODE_NAME)
    registry.heartbeat("other-box")
    Node.objects.update(last_heartbeat=timezone.now() - timedelta(minutes=5))
    assert sweep_nodes() == ["other-box"]  # the beat's own box is alive: it is running the sweep
    assert Node.objects.get(name=settings.NODE_NAME).state == "ready"


def test_a_worker_stopped_on_purpose_gives_its_box_time_a_silent_one_does_not(settings: Any) -> None:
    settings.NODE_RESTART_GRACE_SECONDS = 60
    registry.heartbeat(settings.NODE_NAME)
    registry.heartbeat("crashed-box")
    Node.objects.update(last_heartbeat=timezone.now() - timedelta(seconds=30))
    registry.expect_back(settings.NODE_NAME)  # what the worker's warm shutdown says
    assert registry.sweep() == ["crashed-box"]
    assert Node.objects.get(name=settings.NODE_NAME).state == "ready"
    assert registry.sweep(now=timezone.now() + timedelta(seconds=65)) == [settings.NODE_NAME]
