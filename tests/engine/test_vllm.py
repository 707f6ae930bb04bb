"""The real vLLM CPU engine under the console: deploy with one click in the web view, wait for
ready, chat straight to the replica with its key and through the gateway with a department's key
(the openai client: chat, streaming, completions, models, a client leaving mid-stream, a revoked
key), kill the engine and see the loop bring it back, restart the Celery worker and see the replica
adopted (not duplicated), scale to 2, kill one replica under gateway load and see every request
answered, scale back, stop and see the port free and no process left. Slow (engine start-ups of
about a minute each)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import openai
import orjson
import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse

from appliance.jobs import run_job
from gateway import admission
from gateway.app import GatewayApp
from gateway.directory import Route
from models_catalog.models import LocalModel, ModelJob
from models_catalog.tasks import model_job_body
from provisioning import engine_metrics, launcher
from provisioning.models import Deployment, EngineSample, Replica
from provisioning.runtimes import detect
from provisioning.tasks import reconcile_node
from tenancy import usage
from tenancy.models import ApiKey, Department, UsageRecord
from tests.gateway.helpers import ServerThread
from tests.gateway.test_admission import requests as shapes
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
    return launcher.our_processes(settings.NODE_NAME)


HELLO = [{"role": "user", "content": "hello"}]


def through_gateway(url: str, redis_db: Any) -> openai.OpenAI:
    """The main paths of the gateway against the real engine; returns a client for later load."""
    department = Department.objects.create(name="Legal", max_tokens_per_request=448)
    department.deployments.set(Deployment.objects.all())
    key, raw = ApiKey.issue(department, "bot")
    client = openai.OpenAI(base_url=url + "/v1", api_key=raw, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny"]
    answer = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5)
    assert answer.usage.completion_tokens > 0 and answer.choices[0].message.content is not None
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].usage.completion_tokens == 8 and all(c.usage is None for c in chunks[:-1])
    assert client.completions.create(model="tiny", prompt="once", max_tokens=4).usage.completion_tokens == 4
    # A client that leaves mid-stream: the engine's request is cancelled, what was delivered is billed.
    # The client runs in a process of its own: this one holds the gateway's event loop, and sharing the
    # GIL with it would delay the client's close until the tiny model (about 1 ms a token) had finished.
    leave = (
        "import httpx, sys\n"
        "body = {'model': 'tiny', 'messages': [{'role': 'user', 'content': 'hello'}], 'max_tokens': 440,"
        " 'stream': True, 'ignore_eos': True}\n"
        "with httpx.stream('POST', sys.argv[1], json=body, headers={'Authorization': 'Bearer ' + sys.argv[2]},"
        " timeout=60) as response:\n"
        "    assert response.status_code == 200, response.status_code\n"
        "    for n, line in enumerate(response.iter_lines()):\n"
        "        assert not line.startswith('data: [DONE]')\n"
        "        if n == 6:\n"
        "            break\n"
    )
    subprocess.run([sys.executable, "-c", leave, url + "/v1/chat/completions", raw], check=True, timeout=60)
    # Billed either way: cut short (499, prompt + what was generated) or, when the tiny model (about
    # 1 ms a token) finished before the close reached the gateway, whole. The cut itself is tested
    # deterministically against the FAKE engine in tests/gateway/.
    chats = UsageRecord.objects.filter(department=department, endpoint="chat/completions")
    assert wait_for(lambda: usage.drain(redis_db) >= 0 and chats.count() == 3, 10), list(chats.values())
    left = chats.latest("created_at")  # recorded when it ended: after the two chats before it
    assert left.prompt_tokens > 0
    assert (left.status == 499 and 0 < left.completion_tokens < 440) or (left.status, left.completion_tokens) == (
        200, 440), (left.status, left.completion_tokens)  # fmt: skip
    records = list(UsageRecord.objects.filter(department=department).values_list("endpoint", "status", "error"))
    assert sum(status == 200 for _, status, _ in records) == 3 + (left.status == 200), records
    key.revoke()
    threading.Event().wait(1.0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    _, raw = ApiKey.issue(department, "load")
    return openai.OpenAI(base_url=url + "/v1", api_key=raw, max_retries=0, timeout=120)


def reservations_hold_on_the_real_engine(url: str, redis_db: Any) -> int:
    """A sample of the property test's request shapes (tests/gateway/test_admission.py) sent through
    the gateway to the real engine: no 5xx, and what the engine counts never passes the reservation.
    Returns how many were answered."""
    department = Department.objects.create(name="Research", max_tokens_per_request=448)
    department.deployments.set(Deployment.objects.all())
    raw = ApiKey.issue(department, "fuzz")[1]
    route = Route(0, "tiny", False, (), 0, context=512)
    answered: list[int] = []

    @hypothesis.settings(max_examples=25, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
    @hypothesis.given(shapes())
    def one(request: tuple[str, dict]) -> None:
        endpoint, body = request
        body["stream"] = False  # the usage is in the body
        response = httpx.post(f"{url}/v1/{endpoint}", json=body, headers={"Authorization": f"Bearer {raw}"},
                              timeout=120)  # fmt: skip
        assert response.status_code < 500, (body, response.text)
        if response.status_code != 200:
            return
        shaped = admission.parse(endpoint, orjson.dumps(body))
        reserved = admission.plan(shaped, route, 448)
        counted = response.json()["usage"]
        assert counted["prompt_tokens"] + (counted.get("completion_tokens") or 0) <= reserved, (body, counted)
        answered.append(counted["total_tokens"])

    one()
    records = UsageRecord.objects.filter(department=department, status=200)
    assert wait_for(lambda: usage.drain(redis_db) >= 0 and records.count() == len(answered), 10)
    assert sum(r.prompt_tokens + r.completion_tokens for r in records) == sum(answered)  # billed as counted
    return len(answered)


def load_while_killing(client: openai.OpenAI, victim_pid: int) -> list[str]:
    """Chats from 4 threads; one replica is killed after a few answers. Returns the outcomes."""
    outcomes: list[str] = []

    def run() -> None:
        for _ in range(8):
            try:
                client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
                outcomes.append("ok")
            except openai.APIError as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(outcomes) >= 4, timeout=60)
    os.killpg(victim_pid, signal.SIGKILL)
    for thread in threads:
        thread.join()
    return outcomes


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
    worker = WorkerProcess(f"worker@{settings.NODE_NAME}", **env).start()
    app = GatewayApp()
    gateway = ServerThread(app, app.close).start()
    try:
        with Beat():
            form = {"model": model.pk, "name": "tiny", "runtime": runtime.pk, "replicas": 1, "tensor_parallel": 1,
                    "gpu_memory_fraction": 0.15, "max_model_len": 512, "extra_args": "--max-num-seqs 8"}  # fmt: skip
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
            # Its own metrics, under the names this vLLM uses (engine_metrics tolerates others).
            reading = engine_metrics.scrape(first.port, first.key())
            assert {"running", "waiting", "kv_cache", "prompt_tokens", "generation_tokens"} <= set(reading.values)
            assert {"ttft", "itl", "queue", "e2e"} <= set(reading.buckets), reading.buckets.keys()
            assert engine_metrics.collect() == 1
            httpx.post(f"{first.base_url}/v1/completions", headers={"Authorization": f"Bearer {first.key()}"},
                       json={"model": "tiny", "prompt": "once upon", "max_tokens": 6}, timeout=60)  # fmt: skip
            assert engine_metrics.collect() == 1
            served = EngineSample.objects.filter(replica=first).latest("pk")
            assert served.generation_tps > 0 and served.prompt_tps > 0, vars(served)
            assert served.ttft_p50 is not None and served.e2e_p99 is not None and served.kv_cache is not None
            no_key = httpx.get(f"{first.base_url}/v1/models", timeout=10)
            assert no_key.status_code == 401  # nothing bypasses the gateway without the replica's key
            load_client = through_gateway(gateway.url, redis_db)
            assert reservations_hold_on_the_real_engine(gateway.url, redis_db) > 0

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
            threading.Event().wait(1.0)  # the gateway sees the new replica
            outcomes = load_while_killing(load_client, replica(1).pid)
            assert outcomes == ["ok"] * 32, outcomes  # requests on the dead replica went to the other one
            admin_client.post(reverse("provisioning:act", args=["tiny", "scale"]), {"replicas": 1})
            assert wait_for(lambda: replica(1).state == "stopped", timeout=60)

            port = replica().port
            admin_client.post(reverse("provisioning:act", args=["tiny", "stop"]))
            assert wait_for(lambda: replica().state == "stopped", timeout=60)
            assert engines() == {} and not launcher.port_in_use(port)
    finally:
        gateway.stop()
        worker.stop()
        for pid in engines():
            launcher.stop(pid, grace=5)
    assert Deployment.objects.get().desired == "stopped"
