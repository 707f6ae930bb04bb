"""The reconcile loop with a FAKE engine (fast): launch, ready, crash and restart with backoff,
failure after repeated crashes, adoption without a duplicate, scale, stop, orphans, the lock."""

from __future__ import annotations

import os
import signal
from typing import Any
from unittest import mock

import httpx
import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse

from appliance.models import AuditEvent
from models_catalog.models import JobConflict, LocalModel
from provisioning import launcher
from provisioning.engines import engine_for
from provisioning.models import Deployment, EngineRuntime, Replica
from provisioning.reconcile import reconcile
from tests.workers import wait_for

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fast_loop(settings: Any) -> None:
    settings.REPLICA_BACKOFF_SECONDS = 0
    settings.REPLICA_MAX_CRASHES = 3
    settings.REPLICA_STOP_GRACE_SECONDS = 3


@pytest.fixture
def no_kick() -> Any:
    with mock.patch("appliance.celery.app.send_task"), mock.patch("provisioning.tasks.reconcile_node.apply_async"):
        yield


def deploy(client: Client, model: LocalModel, runtime: EngineRuntime, **extra: Any) -> Any:
    form = {"model": model.pk, "name": "chat", "runtime": runtime.pk, "replicas": 1, "tensor_parallel": 1,
            "gpu_memory_fraction": 0.01, "max_model_len": 512, "extra_args": "", **extra}  # fmt: skip
    return client.post(reverse("provisioning:deploy"), form)


def until(state: str, ordinal: int = 0, passes: int = 100) -> Replica:
    def check() -> bool:
        reconcile()
        return Replica.objects.filter(ordinal=ordinal, state=state).exists()

    assert wait_for(check, timeout=30, interval=0.2), list(Replica.objects.values("ordinal", "state", "last_error"))
    return Replica.objects.get(ordinal=ordinal)


def ours() -> dict[int, str]:
    """This run's engines (another run on the machine uses another NODE_NAME)."""
    return launcher.our_processes(settings.NODE_NAME)


@pytest.fixture
def cleanup() -> Any:
    yield
    for pid in ours():
        launcher.stop(pid, grace=1)


def test_deploy_ready_crash_restart_adopt_scale_stop(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any, cleanup: Any
) -> None:
    response = deploy(admin_client, tiny_model, fake_runtime)
    assert response.status_code == 302, response.content[:2000]
    assert deploy(admin_client, tiny_model, fake_runtime).status_code == 400  # a double click: one deployment
    assert Deployment.objects.count() == 1
    replica = until("ready")
    assert engine_for().ready(replica.port, replica.key(), "chat")
    first_pid = replica.pid

    os.killpg(replica.pid, signal.SIGKILL)  # the engine dies
    replica = until("ready")
    assert replica.pid != first_pid and replica.restart_count == 1

    # A console or worker restart: a fresh pass finds the process alive and adopts it.
    reconcile()
    assert Replica.objects.get(pk=replica.pk).pid == replica.pid
    assert list(ours()) == [replica.pid]

    admin_client.post(reverse("provisioning:act", args=["chat", "scale"]), {"replicas": 2})
    second = until("ready", ordinal=1)
    assert second.port != replica.port and len(ours()) == 2
    admin_client.post(reverse("provisioning:act", args=["chat", "scale"]), {"replicas": 1})
    assert until("stopped", ordinal=1).pid is None and len(ours()) == 1

    with pytest.raises(JobConflict, match="deployment chat"):
        tiny_model.request_delete()

    port = replica.port
    admin_client.post(reverse("provisioning:act", args=["chat", "stop"]))
    until("stopped")
    assert ours() == {} and not launcher.port_in_use(port)
    admin_client.post(reverse("provisioning:act", args=["chat", "delete"]))
    assert not Deployment.objects.exists()
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"deployment.create", "deployment.scale", "deployment.stop", "deployment.delete"} <= actions


def test_model_that_crashes_on_start_fails_with_its_log(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any, cleanup: Any
) -> None:
    (tiny_model.ready_path / "CRASH").write_text("")
    deploy(admin_client, tiny_model, fake_runtime)
    replica = until("failed")
    assert replica.consecutive_crashes == 3
    assert "crashed on start (fake)" in replica.last_error and "3 times in a row" in replica.last_error
    assert ours() == {}
    (tiny_model.ready_path / "CRASH").unlink()
    admin_client.post(reverse("provisioning:act", args=["chat", "restart"]))
    until("ready")


def test_orphan_processes_are_stopped(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any, cleanup: Any
) -> None:
    deploy(admin_client, tiny_model, fake_runtime)
    replica = until("ready")
    Replica.objects.all().delete()  # a deployment deleted behind the loop's back
    Deployment.objects.all().delete()
    result = reconcile()
    assert result["orphans_stopped"] == [replica.pid] and ours() == {}


def test_broken_runtime_and_unready_model(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any
) -> None:
    deploy(admin_client, tiny_model, fake_runtime)
    EngineRuntime.objects.update(python_path="/nonexistent/python")
    replica = until("failed")
    assert "not installed or broken" in replica.last_error and ours() == {}


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"extra_args": "--host 0.0.0.0"}, "extra_args"), ({"extra_args": "--trust-remote-code"}, "extra_args"),
     ({"gpu_ids": "0,1"}, "gpu_ids"), ({"name": "Bad Name!"}, "name"), ({"replicas": 0}, "replicas")],
)  # fmt: skip
def test_deploy_form_refuses_bad_input(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any, extra: dict, field: str
) -> None:
    response = deploy(admin_client, tiny_model, fake_runtime, **extra)
    assert response.status_code == 400
    assert field in response.context["form"].errors
    assert not Deployment.objects.exists()


def test_not_ready_model_cannot_be_deployed(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any
) -> None:
    LocalModel.objects.update(status=LocalModel.Status.DOWNLOADING)
    response = deploy(admin_client, tiny_model, fake_runtime)
    assert response.status_code == 400 and "model" in response.context["form"].errors


def test_too_big_for_memory_is_refused_up_front(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any
) -> None:
    response = deploy(admin_client, tiny_model, fake_runtime, gpu_memory_fraction=1.0)
    assert response.status_code == 400 and "Not enough memory" in str(response.context["form"].errors)


def test_viewer_cannot_deploy(viewer_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime) -> None:
    assert deploy(viewer_client, tiny_model, fake_runtime).status_code == 403
    assert not Deployment.objects.exists()


def test_one_pass_at_a_time(redis_db: Any) -> None:
    lock = redis_db.lock(f"console:reconcile:{settings.NODE_NAME}", timeout=10)
    assert lock.acquire()
    from appliance.worker import redis_client

    try:
        assert reconcile(client=redis_client()) == {"skipped": "another reconcile pass is running"}
    finally:
        lock.release()


def test_startup_watcher_marks_ready_without_waiting_for_a_tick(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any, cleanup: Any
) -> None:
    from provisioning.reconcile import watch_startup

    deploy(admin_client, tiny_model, fake_runtime)
    with mock.patch("provisioning.tasks.watch_startup.apply_async") as queued:
        reconcile()
    replica = Replica.objects.get()
    assert replica.state == "starting"
    queued.assert_called_once_with(args=[replica.pk, replica.pid], queue=f"node.{settings.NODE_NAME}")
    assert watch_startup(replica.pk, replica.pid, interval=0.05) == "ready"
    assert Replica.objects.get().state == "ready"
    assert watch_startup(replica.pk, replica.pid) == "no longer starting"


def test_port_taken_by_another_program_is_a_crash_then_a_new_port(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any, cleanup: Any
) -> None:
    import socket

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real_free_port = launcher.free_port
    ports = iter([taken])
    try:
        with mock.patch.object(launcher, "free_port", lambda: next(ports, None) or real_free_port()):
            deploy(admin_client, tiny_model, fake_runtime)
            replica = until("ready")
        assert replica.port != taken and replica.restart_count == 1
        assert "exited while starting" in replica.last_error  # the first try, kept for the admin
    finally:
        squatter.close()


def test_api_deployments(
    admin_user: Any, client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any, cleanup: Any
) -> None:
    from appliance.models import ApiToken

    _, raw = ApiToken.issue(admin_user, "t")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {raw}"}
    body = {"model_id": tiny_model.pk, "name": "api-chat", "gpu_memory_fraction": 0.01, "max_model_len": 256}
    created = client.post("/api/v1/deployments", body, content_type="application/json", **auth)
    assert created.status_code == 201, created.content
    bad = client.post("/api/v1/deployments", {**body, "name": "x", "extra_args": "--host 0.0.0.0"},
                      content_type="application/json", **auth)  # fmt: skip
    assert bad.status_code == 422 and "not an allowed vLLM argument" in bad.json()["detail"]
    until("ready")
    listed = client.get("/api/v1/deployments", **auth).json()
    assert listed[0]["name"] == "api-chat" and listed[0]["replica_states"][0]["state"] == "ready"
    assert listed[0]["id"] == created.json()["id"] == Deployment.objects.get(name="api-chat").pk
    scaled = client.post(f"/api/v1/deployments/{listed[0]['id']}/scale", {"replicas": 0},
                         content_type="application/json", **auth)  # fmt: skip
    assert scaled.json()["replicas"] == 0
    until("stopped")
    assert ours() == {}


def test_trust_remote_code_only_when_allowed_for_the_model(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any
) -> None:
    assert deploy(admin_client, tiny_model, fake_runtime, extra_args="--trust-remote-code").status_code == 400
    admin_client.post(reverse("models_catalog:act", args=[tiny_model.pk, "allow-remote-code"]), {"allow": "1"})
    assert LocalModel.objects.get().allow_remote_code
    assert deploy(admin_client, tiny_model, fake_runtime, extra_args="--trust-remote-code").status_code == 302
    assert Deployment.objects.get().extra_args == ["--trust-remote-code"]


def test_deploy_form_is_prefilled_from_the_model(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime
) -> None:
    form = admin_client.get(reverse("provisioning:deploy"), {"model": tiny_model.pk}).context["form"]
    assert form.initial["name"] == "tiny" and form.initial["max_model_len"] == 2048
    assert form.initial["gpu_memory_fraction"] == 0.1 and form.initial["runtime"] == fake_runtime.pk


def test_deployment_page_shows_alerts_of_its_gpus(admin_client: Client, tiny_model: LocalModel, db: Any) -> None:
    from gpus.collect import collect
    from gpus.probe import SimulatedProbe

    collect(SimulatedProbe(count=2, faults=lambda: [{"gpu": 1, "kind": "xid", "value": 79}]), node="gpubox")
    runtime = EngineRuntime.objects.create(node="gpubox", name="vllm", package="vllm", python_path="/x", status="ready")
    deployment = Deployment.objects.create(name="chat", model=tiny_model, runtime=runtime, node="gpubox")
    Replica.objects.create(deployment=deployment, ordinal=0, node="gpubox", gpu_ids=[1], state="ready", pid=4242)
    html = admin_client.get(reverse("provisioning:detail", args=["chat"])).content.decode()
    assert "XID 79" in html and "GPU 1" in html


def test_deployment_page_tells_how_to_call_it(admin_client: Client, deployment_factory: Any) -> None:
    from tenancy.models import Department

    deployment = deployment_factory(name="chat")
    html = admin_client.get(reverse("provisioning:detail", args=["chat"])).content.decode()
    assert 'base_url="http://testserver/v1"' in html and 'model="chat"' in html
    Department.objects.create(name="Legal").deployments.add(deployment)
    assert ">Legal</a>" in admin_client.get(reverse("provisioning:detail", args=["chat"])).content.decode()


def test_gpu_processes_name_their_replica(admin_client: Client, tiny_model: LocalModel, db: Any) -> None:
    from gpus.models import Gpu

    runtime = EngineRuntime.objects.create(node="gpubox", name="vllm", package="vllm", python_path="/x", status="ready")
    deployment = Deployment.objects.create(name="chat", model=tiny_model, runtime=runtime, node="gpubox")
    Replica.objects.create(deployment=deployment, ordinal=0, node="gpubox", gpu_ids=[0], state="ready", pid=4242)
    Gpu.objects.create(node="gpubox", index=0, uuid="GPU-a", health="ok",
                       latest={"processes": [{"pid": 4250, "memory": 1024**3, "pgid": 4242}]})  # fmt: skip
    assert "chat#0" in admin_client.get(reverse("gpus:list")).content.decode()


def test_an_engine_that_stops_answering_is_restarted_though_its_health_says_ok(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any, cleanup: Any,
    settings: Any,
) -> None:  # fmt: skip
    settings.REPLICA_ANSWER_SECONDS = 0  # ask at every pass
    settings.REPLICA_ANSWER_TIMEOUT_SECONDS = 1
    settings.REPLICA_ANSWER_FAILURES = 2
    assert deploy(admin_client, tiny_model, fake_runtime).status_code == 302
    replica = until("ready")
    reconcile()  # it answers: nothing happens
    assert Replica.objects.get(pk=replica.pk).pid == replica.pid
    assert Replica.objects.get(pk=replica.pk).answer_failures == 0
    hang = tiny_model.ready_path / "HANG"
    hang.touch()
    try:
        assert httpx.get(f"http://127.0.0.1:{replica.port}/health").status_code == 200  # looks fine
        reconcile()
        assert Replica.objects.get(pk=replica.pk).answer_failures == 1  # one miss is not enough
        reconcile()
        restarted = Replica.objects.get(pk=replica.pk)
        assert restarted.state in ("crashed", "starting") and restarted.restart_count == 1
        assert "did not answer a one-token completion (no answer within 1 s), 2 times in a row" in (
            restarted.last_error)  # fmt: skip
    finally:
        hang.unlink()
    assert until("ready").pid != replica.pid
