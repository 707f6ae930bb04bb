"""The real vLLM CPU engine under the console: deploy with one click in the web view, wait for
ready, chat straight to the replica with its key, kill the engine and see the loop bring it back,
restart the Celery worker and see the replica adopted (not duplicated), scale to 2 and back, stop
and see the port free and no process left. Slow (engine start-ups of about a minute each)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse

from appliance.jobs import run_job
from models_catalog.models import LocalModel, ModelJob
from models_catalog.tasks import model_job_body
from provisioning import launcher
from provisioning.models import Deployment, Replica
from provisioning.runtimes import detect
from provisioning.tasks import reconcile_node
from tests.workers import WorkerProcess, wait_for

ENGINE_START = 300  # seconds allowed for one engine start-up on a busy 2-core box


class Beat:
    """Sends the reconcile task every second, as Celery beat does in production."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            reconcile_node.apply_async(queue=settings.NODE_QUEUE, expires=5)

    def __enter__(self) -> Beat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def replica(ordinal: int = 0) -> Replica:
    return Replica.objects.get(deployment__name="tiny", ordinal=ordinal)


def state(ordinal: int = 0) -> str | None:
    found = Replica.objects.filter(deployment__name="tiny", ordinal=ordinal).first()
    return found.state if found else None


def engines() -> dict[int, str]:
    return {pid: m for pid, m in launcher.our_processes().items() if m.startswith(f"{settings.NODE_NAME}:")}


@pytest.mark.engine
@pytest.mark.django_db(transaction=True)
def test_real_engine_lifecycle(
    engine_python: Path, tiny_model_dir: Path, admin_client: Client, settings: Any, tmp_path: Path, redis_db: Any
) -> None:
    settings.DATA_DIR = tmp_path / "data"
    settings.DISK_RESERVE_BYTES = 0
    job = LocalModel.request_import(str(tiny_model_dir), "local/tiny-llama", enqueue=False)
    assert run_job(ModelJob, job.pk, model_job_body) == "succeeded"
    model = LocalModel.objects.get()
    runtime = next(r for r in detect() if r.python_path == str(engine_python))
    assert runtime.status == "ready", runtime.error

    env = {"DATA_DIR": str(settings.DATA_DIR), "DISK_RESERVE_BYTES": "0", "REPLICA_BACKOFF_SECONDS": "1",
           "REPLICA_STOP_GRACE_SECONDS": "10", "ENGINES_DIR": str(settings.ENGINES_DIR)}  # fmt: skip
    worker = WorkerProcess("worker@testnode", **env).start()
    try:
        with Beat():
            form = {"model": model.pk, "name": "tiny", "runtime": runtime.pk, "replicas": 1, "tensor_parallel": 1,
                    "gpu_memory_fraction": 0.05, "max_model_len": 512, "extra_args": "--max-num-seqs 8"}  # fmt: skip
            assert admin_client.post(reverse("provisioning:deploy"), form).status_code == 302
            assert wait_for(lambda: state() == "ready", timeout=ENGINE_START), (
                replica().last_error,
                worker.output(),
            )
            first = replica()
            answer = httpx.post(
                f"{first.base_url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {first.key()}"},
                json={"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] > 0
            no_key = httpx.get(f"{first.base_url}/v1/models", timeout=10)
            assert no_key.status_code == 401  # nothing bypasses the gateway without the replica's key

            os.killpg(first.pid, signal.SIGKILL)  # the engine dies
            assert wait_for(lambda: replica().restart_count == 1 and replica().state == "ready", timeout=ENGINE_START)
            second = replica()
            assert second.pid != first.pid

            worker.kill()  # the worker dies; the engine it started keeps running
            assert launcher.alive(second.pid, launcher.marker_value(settings.NODE_NAME, second.pk))
            worker.start()
            assert wait_for(lambda: "ready" == replica().state, timeout=30)
            reconcile_node.apply_async(queue=settings.NODE_QUEUE)
            threading.Event().wait(5)
            assert replica().pid == second.pid and list(engines()) == [second.pid]  # adopted, not duplicated

            admin_client.post(reverse("provisioning:act", args=["tiny", "scale"]), {"replicas": 2})
            assert wait_for(lambda: state(1) == "ready", timeout=ENGINE_START), replica(1).last_error
            assert len(engines()) == 2
            admin_client.post(reverse("provisioning:act", args=["tiny", "scale"]), {"replicas": 1})
            assert wait_for(lambda: replica(1).state == "stopped", timeout=60)

            port = replica().port
            admin_client.post(reverse("provisioning:act", args=["tiny", "stop"]))
            assert wait_for(lambda: replica().state == "stopped", timeout=60)
            assert engines() == {} and not launcher.port_in_use(port)
    finally:
        worker.stop()
        for pid in engines():
            launcher.stop(pid, grace=5)
    assert Deployment.objects.get().desired == "stopped"
