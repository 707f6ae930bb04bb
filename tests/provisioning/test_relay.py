"""The node relay (``manage.py relay``, a real process) in front of a FAKE engine on loopback: only the
console's paths, only with the replica's own key, answers streamed through, routes followed as the
node publishes them; and the gateway reaching replicas of another box through it. The same across
network namespaces (a real second and third box) is tests/nodes/test_cluster_network.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from django.conf import settings

from nodes.models import Node
from provisioning import reconcile, relay
from provisioning.models import Replica
from tests.gateway.helpers import FakeEngineProcess, RelayProcess, gateway_client
from tests.models_catalog.helpers import free_port

pytestmark = pytest.mark.django_db(transaction=True)
BOX = "box2"


@pytest.fixture
def engine() -> Iterator[FakeEngineProcess]:
    process = FakeEngineProcess(key="replica-secret", tokens=6).start()
    yield process
    process.kill()


@pytest.fixture
def data_dir(settings: Any, tmp_path: Path) -> Path:
    settings.DATA_DIR = tmp_path / "data"
    settings.VAR_DIR = tmp_path  # the gateway's spool, the test's own
    return settings.DATA_DIR


@pytest.fixture
def node_relay(data_dir: Path, settings: Any) -> Iterator[RelayProcess]:
    process = RelayProcess(data_dir, BOX).start()
    settings.RELAY_PORT = process.port
    yield process
    process.stop()


def replica_on(deployment: Any, port: int, key: str, ordinal: int = 0, node: str = BOX) -> Replica:
    replica = Replica(deployment=deployment, ordinal=ordinal, node=node, port=port, pid=1, state="ready")
    replica.set_key(key)
    replica.save()
    return replica


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_relay_passes_only_the_consoles_paths_and_only_with_the_replicas_key(
    deployment_factory: Any, engine: FakeEngineProcess, node_relay: RelayProcess
) -> None:
    replica = replica_on(deployment_factory(), engine.port, engine.key)
    relay.publish(BOX, [replica])
    base = f"{node_relay.url}/r/{replica.pk}"
    # The engine itself answers /metrics to anyone who reaches it: that is why it stays on loopback.
    assert httpx.get(f"{engine.url}/metrics").status_code == 200
    for headers in ({}, bearer("not-the-key"), {"Authorization": engine.key}, {"Authorization": "Basic x"}):
        assert httpx.get(f"{base}/metrics", headers=headers).status_code == 401
        assert httpx.get(f"{base}/health", headers=headers).status_code == 401
        answer = httpx.post(f"{base}/v1/completions", headers=headers, json={"model": "tiny", "prompt": "hi"})
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    # Paths vLLM serves without its key are not served at all, key or not (nor smuggled past the prefix).
    refused = (("POST", "tokenize"), ("POST", "pause"), ("POST", "invocations"), ("GET", "version"),
               ("GET", "_fake/requests"), ("POST", "v1/../tokenize"), ("GET", "v1/models/../../metrics/x"))  # fmt: skip
    for method, path in refused:
        response = httpx.request(method, f"{base}/{path}", headers=bearer(engine.key), json={"prompt": "x"})
        assert response.status_code == 404, (method, path, response.status_code)
    assert httpx.get(f"{node_relay.url}/metrics").status_code == 404
    # Another replica's id with this replica's key: refused like a wrong key (which ids exist is not told).
    assert httpx.get(f"{node_relay.url}/r/{replica.pk + 1}/health", headers=bearer(engine.key)).status_code == 401
    # With the key: what the console asks of an engine.
    assert httpx.get(f"{base}/health", headers=bearer(engine.key)).status_code == 200
    assert "vllm:num_requests_running" in httpx.get(f"{base}/metrics", headers=bearer(engine.key)).text
    answer = httpx.post(f"{base}/v1/completions", headers=bearer(engine.key), json={"model": "tiny", "prompt": "hi"})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 6
    assert [seen["path"] for seen in engine.seen()] == ["/v1/completions"]  # nothing refused reached the engine


def test_the_relay_streams_and_follows_the_routes_the_node_publishes(
    deployment_factory: Any, engine: FakeEngineProcess, node_relay: RelayProcess
) -> None:
    deployment = deployment_factory()
    first = replica_on(deployment, engine.port, engine.key)
    base = f"{node_relay.url}/r/{first.pk}"
    assert httpx.get(f"{base}/health", headers=bearer(engine.key)).status_code == 401  # nothing published yet
    relay.publish(BOX, [first])
    body = {"model": "tiny", "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(engine.key), json=body) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert len(events) == 6 + 2 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 6
    # A replica whose engine is gone: 502 marked as the relay's, so the gateway tries another.
    gone = replica_on(deployment, free_port(), "other-secret", ordinal=1)
    relay.publish(BOX, [first, gone])
    failed = httpx.get(f"{node_relay.url}/r/{gone.pk}/health", headers=bearer("other-secret"))
    assert failed.status_code == 502 and failed.headers[relay.FAILURE_HEADER] == "unreachable"
    # Unpublished (stopped): refused again; a damaged table keeps the last good one.
    relay.publish(BOX, [gone])
    assert httpx.get(f"{base}/health", headers=bearer(engine.key)).status_code == 401
    relay.table_path(BOX).write_text("{not json")
    assert httpx.get(f"{node_relay.url}/r/{gone.pk}/health", headers=bearer("other-secret")).status_code == 502


def test_the_node_publishes_the_replicas_that_have_a_process(deployment_factory: Any, data_dir: Path) -> None:
    deployment = deployment_factory()
    running = replica_on(deployment, 9001, "k1", node=settings.NODE_NAME)
    replica_on(deployment, 9002, "k2", ordinal=1, node=settings.NODE_NAME).__class__.objects.filter(ordinal=1).update(
        state="stopped"
    )
    replica_on(deployment, 9003, "k3", ordinal=2, node="elsewhere")
    reconcile.publish_routes(settings.NODE_NAME)
    table = json.loads(relay.table_path(settings.NODE_NAME).read_text())["replicas"]
    assert table == {str(running.pk): {"port": 9001, "key_sha256": relay.key_digest("k1")}}
    assert relay.table_path(settings.NODE_NAME).stat().st_mode & 0o777 == 0o600  # hashes only, and still private


def test_the_gateway_reaches_replicas_of_another_box_through_its_relay(
    deployment_factory: Any, engine: FakeEngineProcess, node_relay: RelayProcess, settings: Any
) -> None:
    settings.GATEWAY_CACHE_SECONDS = 0  # every request sees the routes as they are now
    deployment = deployment_factory()
    live = replica_on(deployment, engine.port, engine.key)
    dead = replica_on(deployment, free_port(), "dead-secret", ordinal=1)
    relay.publish(BOX, [live, dead])
    Node.objects.create(name=BOX, address="127.0.0.1")
    with gateway_client(deployment) as client:
        for _ in range(4):  # the dead replica is tried at most once, then the live one answers
            answer = client.completions.create(model="tiny", prompt="hello", max_tokens=3)
            assert answer.usage.completion_tokens == 3
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, max_tokens=4)  # fmt: skip
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "tok " * 4
        # A box with no known address: its replicas are not routed to (nothing to reach them by).
        Node.objects.filter(name=BOX).update(address="")
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="tiny", prompt="hello", max_tokens=3)
        assert refused.value.status_code == 503
    assert len([seen for seen in engine.seen() if seen["path"] == "/v1/completions"]) == 4
