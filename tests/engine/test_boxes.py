"""Two boxes on one machine, with the real vLLM CPU engine: box 1 is this run's NODE_NAME (the console:
its worker, its relay on the bridge), box 2 a network namespace with a worker and a relay of its own,
sharing the database and Redis through forwarders on the bridge. A deployment placed on any box,
with box 1 draining, goes to box 2: the model is copied there over box 1's relay first, and the
replica answers through the console's gateway over the cluster network. Box 2's link is cut: its
replica is lost, the gateway stops sending to it, and it is replaced on box 1. When box 2's link is
back, its old engine is stopped, not adopted twice. Then one engine over both boxes (pipeline parallel
2) answers as the one-box engine does, and is restarted whole when its second rank dies. Slow (four
engine start-ups, about 5 minutes): it runs in the PostgreSQL pass only."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse

from appliance.jobs import run_job
from gateway.app import GatewayApp
from models_catalog.models import LocalModel, ModelCopy, ModelJob
from models_catalog.tasks import model_job_body
from nodes.models import Node
from provisioning import launcher
from provisioning.models import Deployment, EngineRuntime, Replica
from provisioning.runtimes import detect
from tenancy.models import ApiKey, Department
from tests.gateway.helpers import RelayProcess, ServerThread, free_port
from tests.nodes.test_cluster_network import Network, ip, network  # noqa: F401 - the fixture
from tests.processes import end
from tests.workers import WorkerProcess, database_url, wait_for

ENGINE_START = 300
BOX2 = "box2"
HELLO = [{"role": "user", "content": "hello"}]

pytestmark = [
    pytest.mark.engine,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]


class Beat(threading.Thread):
    """Celery beat's node sweep and reconcile round, every second, to the workers' default queue."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.halt = threading.Event()

    def run(self) -> None:
        from appliance.celery import app

        while not self.halt.wait(1.0):
            app.send_task("nodes.sweep", queue="default", expires=3)
            app.send_task("provisioning.reconcile_all", queue="default", expires=3)


def forward(address: str, port: int) -> subprocess.Popen:
    """Make a service of the host's loopback reachable on the bridge (DESIGN: socat, as on a real box)."""
    return subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},bind={address},fork,reuseaddr", f"TCP:127.0.0.1:{port}"], start_new_session=True
    )  # its forks, one per connection, go with it


def on_bridge(url: str, address: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.replace(parts.hostname or "", address)).geturl()


@pytest.fixture
def two_boxes(network: Network, engine_python: Path, tiny_model_dir: Path, settings: Any,  # noqa: F811
              tmp_path: Path) -> Iterator[dict[str, Any]]:  # fmt: skip
    if connection.vendor != "postgresql":  # box 2 would reach an SQLite file past any cut link
        pytest.skip("several boxes share PostgreSQL; this runs in the suite's PostgreSQL pass")
    bridge, box2 = network.address(1), network.address(2)
    settings.DATA_DIR, settings.DISK_RESERVE_BYTES = tmp_path / "box1", 0
    settings.NODE_ADDRESS, settings.RELAY_PORT, settings.GATEWAY_CACHE_SECONDS = bridge, free_port(), 0
    job = LocalModel.request_import(str(tiny_model_dir), "local/tiny-llama", enqueue=False)
    assert run_job(ModelJob, job.pk, model_job_body) == "succeeded"
    runtime = next(r for r in detect() if r.python_path == str(engine_python))
    EngineRuntime.objects.create(node=BOX2, name=runtime.name, package=runtime.package, version=runtime.version,
                                 python_path=runtime.python_path, status="ready")  # fmt: skip
    redis_port = urlsplit(settings.REDIS_URL).port or 6379
    services = [forward(bridge, redis_port)]
    services.append(forward(bridge, int(connection.settings_dict["PORT"] or 5432)))
    database = on_bridge(database_url(), bridge)
    common = {"DISK_RESERVE_BYTES": "0", "REPLICA_BACKOFF_SECONDS": "1", "REPLICA_STOP_GRACE_SECONDS": "10",
              "NODE_LOST_SECONDS": "5", "RELAY_PORT": str(settings.RELAY_PORT), "RECONCILE_SECONDS": "1",
              "ENGINES_DIR": str(settings.ENGINES_DIR)}  # fmt: skip
    # Two ranks of one engine on this 2-core machine: a core each (ENGINE_NOTES.md).
    workers = [
        WorkerProcess(f"worker@{settings.NODE_NAME}", concurrency=2, **common, DATA_DIR=str(settings.DATA_DIR),
                      NODE_ADDRESS=bridge, ENGINE_CPU_BIND="0"),
        WorkerProcess(f"worker@{BOX2}", concurrency=2, netns=network.box2, **common, NODE_NAME=BOX2,
                      NODE_ADDRESS=box2, DATA_DIR=str(tmp_path / "box2"), DATABASE_URL=database, ENGINE_CPU_BIND="1",
                      TEST_REDIS_URL=on_bridge(settings.REDIS_URL, bridge)),
    ]  # fmt: skip
    relays = [
        RelayProcess(settings.DATA_DIR, settings.NODE_NAME, host=bridge, port=settings.RELAY_PORT),
        RelayProcess(tmp_path / "box2", BOX2, host=box2, netns=network.box2, port=settings.RELAY_PORT),
    ]
    app = GatewayApp()
    gateway = ServerThread(app, app.close)
    beat = Beat()
    try:
        for process in [*relays, *workers, gateway]:
            process.start()
        beat.start()
        assert wait_for(lambda: Node.objects.filter(state="ready").count() == 2, 60), (
            list(Node.objects.values()),
            workers[1].output(),
        )
        yield {"runtime": runtime, "gateway": gateway, "workers": workers, "network": network}
    finally:
        beat.halt.set()
        gateway.stop()
        for process in [*workers, *relays]:
            process.stop()
        for service in services:
            end(service, group=True)
        for node in (settings.NODE_NAME, BOX2):
            for pid in launcher.our_processes(node):
                launcher.stop(pid, grace=5)


def replica() -> Replica:
    return Replica.objects.get(deployment__name="tiny")


def where() -> tuple[str, str] | None:
    """(box, state) of the deployment's replica; None before the scheduler made it."""
    found = Replica.objects.filter(deployment__name="tiny").first()
    return (found.node, found.state) if found else None


def test_a_deployment_on_any_box_is_copied_placed_reached_and_replaced_when_its_box_is_cut_off(
    two_boxes: dict, admin_client: Client, settings: Any
) -> None:
    box1 = settings.NODE_NAME
    Node.objects.get(name=box1).set_draining(True)  # so the deployment goes to box 2
    form = {"model": LocalModel.objects.get().pk, "name": "tiny", "runtime": two_boxes["runtime"].pk, "replicas": 1,
            "tensor_parallel": 1, "gpu_memory_fraction": 0.15, "max_model_len": 512, "any_node": "on",
            "extra_args": "--max-num-seqs 8"}  # fmt: skip
    assert admin_client.post(reverse("provisioning:deploy"), form).status_code == 302
    workers = two_boxes["workers"]
    assert wait_for(lambda: where() == (BOX2, "ready"), ENGINE_START), (
        list(Replica.objects.values("node", "state", "last_error")),
        workers[1].output(),
    )
    on_box2 = replica()
    assert on_box2.node == BOX2
    copy = ModelCopy.objects.get(node=BOX2)  # copied from box 1's relay, with its progress
    assert (copy.status, copy.source_node) == ("ready", box1)
    assert ModelJob.objects.get(kind="sync", node=BOX2).status == "succeeded"

    department = Department.objects.create(name="Legal")
    department.deployments.set(Deployment.objects.all())
    client = openai.OpenAI(base_url=two_boxes["gateway"].url + "/v1", api_key=ApiKey.issue(department, "bot")[1],
                           max_retries=0, timeout=60)  # fmt: skip
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5).usage.completion_tokens == 5

    # Box 2 is cut off: lost within seconds, the gateway stops sending to it, replaced on box 1.
    Node.objects.get(name=box1).set_draining(False)
    outside = two_boxes["network"].link(2)
    cut = time.monotonic()
    ip("link", "set", outside, "down")
    assert wait_for(lambda: Node.objects.get(name=BOX2).state == "unreachable", 30)
    lost_after = time.monotonic() - cut
    assert wait_for(lambda: where() == (box1, "pending") or where() == (box1, "starting"), 10), replica().last_error
    assert f"{BOX2} was lost" in replica().last_error
    with pytest.raises(openai.APIStatusError) as refused:  # nothing is sent to the lost replica meanwhile
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5)
    assert refused.value.status_code == 503
    assert wait_for(lambda: where() == (box1, "ready"), ENGINE_START), (replica().last_error, workers[0].output())
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5).usage.completion_tokens == 5
    assert lost_after < 15, lost_after

    # Box 2 is back: its engine, nobody's now, is stopped; the replica stays on box 1.
    assert list(launcher.our_processes(BOX2)) == [on_box2.pid]
    ip("link", "set", outside, "up")
    assert wait_for(lambda: Node.objects.get(name=BOX2).state == "ready", 90), workers[1].output()
    assert wait_for(lambda: not launcher.our_processes(BOX2), 60), workers[1].output()
    assert replica().node == box1 and replica().state == "ready"

    # One model over both boxes (pipeline parallel 2, rank 0 here, rank 1 on box 2): the same greedy
    # output as the one-box replica; when rank 1 dies, both ranks are restarted.
    greedy = {"prompt": "The meaning of", "max_tokens": 8, "temperature": 0}
    reference = client.completions.create(model="tiny", **greedy).choices[0].text
    split = {**form, "name": "split", "any_node": "", "nodes_per_replica": 2, "pipeline_parallel": 2}
    assert admin_client.post(reverse("provisioning:deploy"), split).status_code == 302
    department.deployments.add(Deployment.objects.get(name="split"))
    two = Replica.objects.filter(deployment__name="split")
    assert wait_for(lambda: two.filter(state="ready").exists(), ENGINE_START), (
        list(two.values("state", "last_error")),
        workers[0].output(),
        workers[1].output(),
    )
    whole = two.get()
    part = whole.parts.get()
    assert (whole.node, part.node, part.state) == (box1, BOX2, "running")
    assert client.completions.create(model="split", **greedy).choices[0].text == reference
    os.killpg(part.pid, signal.SIGKILL)
    restarted = lambda: two.filter(restart_count=1, parts__state="running").exclude(pid=whole.pid).exists()  # noqa: E731
    assert wait_for(restarted, 60), list(two.values("state", "last_error"))
    assert wait_for(lambda: whole.pid not in launcher.our_processes(box1), 30)
    assert two.get().parts.get().pid != part.pid
