"""Boxes on a real network: network namespaces on a bridge stand for a second box (``box2``, running a
FAKE engine and the real relay) and a third one (``box3``, anybody else on the cluster network). The
console (this process, the root namespace) reaches box2's replica through box2's relay with the
replica's key; from box3, nothing of the engine answers without that key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from nodes.models import Node
from provisioning import relay
from provisioning.models import Replica
from tests.gateway.helpers import ROOT, FakeEngineProcess, RelayProcess, gateway_client

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Network:
    prefix: str  # "10.213.N": the bridge is .1 (the console), box2 .2, box3 .3
    box2: str
    box3: str

    def address(self, box: int) -> str:
        return f"{self.prefix}.{box}"

    def link(self, box: int) -> str:
        """The host's end of a box's veth pair: set it down to cut the box off."""
        return f"cv{box}h{self.box2.rsplit('-', 1)[1]}"


@pytest.fixture
def network() -> Iterator[Network]:
    tag = os.getpid() % 10000
    net = Network(f"10.213.{os.getpid() % 250 + 1}", f"cbox2-{tag}", f"cbox3-{tag}")
    bridge = f"cbr{tag}"
    made: list[list[str]] = []
    try:
        ip("link", "add", bridge, "type", "bridge")
        made.append(["link", "del", bridge])
        ip("addr", "add", f"{net.address(1)}/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for number, name in ((2, net.box2), (3, net.box3)):
            outside, inside = f"cv{number}h{tag}", f"cv{number}n{tag}"
            ip("netns", "add", name)
            made.append(["netns", "del", name])
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            made.append(["link", "del", outside])
            ip("link", "set", inside, "netns", name)
            ip("link", "set", outside, "master", bridge)
            ip("link", "set", outside, "up")
            ip("netns", "exec", name, "ip", "addr", "add", f"{net.address(number)}/24", "dev", inside)
            ip("netns", "exec", name, "ip", "link", "set", inside, "up")
            ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield net
    finally:
        for command in reversed(made):
            subprocess.run(["ip", *command], capture_output=True)


PROBE = """
import json, socket, sys, httpx
box2, engine_port, relay_base, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
seen = {}
with socket.socket() as sock:
    sock.settimeout(3)
    seen["engine_port"] = sock.connect_ex((box2, engine_port))  # 0 would mean the engine is reachable
for name, method, path, headers in (
    ("metrics", "GET", "metrics", {}), ("health", "GET", "health", {}),
    ("chat", "POST", "v1/chat/completions", {}), ("tokenize", "POST", "tokenize", {}),
    ("wrong_key_metrics", "GET", "metrics", {"Authorization": "Bearer guess"}),
    ("key_tokenize", "POST", "tokenize", {"Authorization": "Bearer " + key}),
    ("key_health", "GET", "health", {"Authorization": "Bearer " + key}),
):
    answer = httpx.request(method, relay_base + "/" + path, headers=headers, json={"prompt": "x"}, timeout=5)
    seen[name] = answer.status_code
print(json.dumps(seen))
"""


def test_a_replica_on_another_box_is_reached_only_through_its_relay_with_its_key(
    network: Network, deployment_factory: Any, settings: Any, tmp_path: Path
) -> None:
    settings.VAR_DIR, settings.GATEWAY_CACHE_SECONDS = tmp_path, 0
    box2_address = network.address(2)
    engine = FakeEngineProcess(key="box2-replica-secret", netns=network.box2, tokens=5).start(probe=False)
    node_relay = RelayProcess(tmp_path / "box2-data", "box2", host=box2_address, netns=network.box2)
    try:
        node_relay.start()
        deployment = deployment_factory()
        replica = Replica(deployment=deployment, ordinal=0, node="box2", port=engine.port, pid=1, state="ready")
        replica.set_key(engine.key)
        replica.save()
        settings.DATA_DIR = tmp_path / "box2-data"  # box2's worker publishes its routes (same disk here)
        relay.publish("box2", [replica])
        settings.RELAY_PORT = node_relay.port
        base = f"{node_relay.url}/r/{replica.pk}"
        deadline = time.monotonic() + 15
        while httpx.get(f"{base}/health", headers={"Authorization": f"Bearer {engine.key}"}).status_code != 200:
            assert time.monotonic() < deadline, "box2's engine did not come up behind its relay"
            time.sleep(0.1)

        # The console: its gateway routes to box2's replica over the cluster network.
        Node.objects.create(name="box2", address=box2_address)
        with gateway_client(deployment) as client:
            answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
            assert answer.usage.completion_tokens == 5

        # The console's own box cannot reach the engine itself either: only the relay is on the network.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{box2_address}:{engine.port}/metrics", timeout=3)

        # A third box: nothing of the engine without the key; with it, only the console's paths.
        probe = subprocess.run(
            ["ip", "netns", "exec", network.box3, sys.executable, "-c", PROBE, box2_address, str(engine.port), base,
             engine.key], cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        seen = json.loads(probe.stdout)
        assert seen["engine_port"] != 0
        assert {name: seen[name] for name in ("metrics", "health", "chat", "wrong_key_metrics")} == dict.fromkeys(
            ("metrics", "health", "chat", "wrong_key_metrics"), 401
        )
        assert seen["tokenize"] == seen["key_tokenize"] == 404  # not served through the relay at all
        assert seen["key_health"] == 200  # the console's own paths, with the replica's key, from anywhere
    finally:
        node_relay.stop()
        engine.kill()
