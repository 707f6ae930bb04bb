"""What an engine is given: a scrubbed environment (no console secrets, hub tokens or database URLs), and
remote code only while the model allows it, checked again at every launch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse

from models_catalog.models import LocalModel
from provisioning import launcher
from provisioning.engines import engine_for
from provisioning.models import Deployment, EngineRuntime, Replica
from provisioning.reconcile import launch
from tests.provisioning.test_reconcile import deploy, until

pytestmark = pytest.mark.django_db

SECRETS = {
    "SECRET_KEY": "console-secret-key-console-secret-key",
    "DATABASE_URL": "postgres://console:dbpass@db/console",
    "REDIS_URL": "redis://:redispass@127.0.0.1:6379/0",
    "METRICS_TOKEN": "metrics-token",
    "HF_TOKEN": "hf_secret",
    "HUGGING_FACE_HUB_TOKEN": "hf_secret2",
    "GITHUB_TOKEN": "gh-secret",
    "BACKUP_PASSWORD": "backup-secret",
    "HTTPS_PROXY": "http://user:proxypass@proxy:3128",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "DJANGO_SETTINGS_MODULE": "appliance.settings",
    "VLLM_API_KEY": "someone-elses-key",
    "VLLM_HOST_IP": "0.0.0.0",  # noqa: S104 - a console variable that must not steer the engine
    "NCCL_AUTH_TOKEN": "under-an-allowed-prefix",
    "CUDA_SECRET": "under-an-allowed-prefix",
}
NEEDED = {
    "HOME": "/home/console",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TMPDIR": "/tmp",
    "OMP_NUM_THREADS": "3",
    "KMP_AFFINITY": "granularity=fine",
    "NCCL_SOCKET_IFNAME": "eth1",
    "LD_LIBRARY_PATH": "/usr/local/cuda/lib64",
}


@pytest.fixture
def console_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**SECRETS, **NEEDED}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def no_kick() -> Any:
    with mock.patch("appliance.celery.app.send_task"), mock.patch("provisioning.tasks.reconcile_node.apply_async"):
        yield


@pytest.fixture
def cleanup() -> Any:
    yield
    for pid in launcher.our_processes(settings.NODE_NAME):
        launcher.stop(pid, grace=1)


def test_engine_environment_is_built_from_an_allowlist(console_env: None) -> None:
    env = engine_for().environment("box:7", "replica-key", [2, 3], cpu=False)
    leaked = {name for name in env if name in SECRETS and name != "VLLM_API_KEY"}
    assert not leaked
    assert not any(secret in value for value in env.values() for secret in SECRETS.values())
    assert {name: env[name] for name in NEEDED} == NEEDED
    assert env["PATH"] == os.environ["PATH"]
    assert env["VLLM_API_KEY"] == "replica-key" and env["APPLIANCE_REPLICA"] == "box:7"
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert engine_for().environment("box:7", "k", [], cpu=True)["CUDA_VISIBLE_DEVICES"] == ""


def test_engine_environment_without_path_still_finds_programs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATH")
    assert engine_for().environment("box:7", "k", [], cpu=True)["PATH"] == os.defpath


def test_a_running_engine_sees_no_console_secret(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any, cleanup: Any,
    console_env: None,
) -> None:  # fmt: skip
    assert deploy(admin_client, tiny_model, fake_runtime).status_code == 302
    replica = until("ready")
    environ = Path(f"/proc/{replica.pid}/environ").read_bytes().decode()
    names = {entry.split("=", 1)[0] for entry in environ.split("\0") if entry}
    assert not names & (set(SECRETS) - {"VLLM_API_KEY"}), names
    assert not any(secret in environ for secret in SECRETS.values())
    assert f"VLLM_API_KEY={replica.key()}" in environ.split("\0")
    assert "OMP_NUM_THREADS=3" in environ.split("\0")


# --- Remote code, checked again at launch ------------------------------------------------------------------


def launched(deployment: Deployment) -> tuple[Replica, list[list[str]]]:
    """Launch one replica of ``deployment`` with the process start replaced: (the replica, commands started)."""
    replica = Replica.objects.create(deployment=deployment, ordinal=0, node=deployment.node)
    with (
        mock.patch.object(launcher, "start", return_value=999_999) as start,
        mock.patch("provisioning.tasks.watch_startup.apply_async"),
    ):
        launch(Replica.objects.select_related("deployment__model", "deployment__runtime").get(pk=replica.pk))
    replica.refresh_from_db()
    return replica, [call.args[0] for call in start.call_args_list]


def make_deployment(model: LocalModel, runtime: EngineRuntime, **fields: Any) -> Deployment:
    return Deployment.objects.create(
        name="chat", model=model, runtime=runtime, node=runtime.node, gpu_memory_fraction=0.01, max_model_len=512,
        **fields,
    )  # fmt: skip


def test_remote_code_withdrawn_after_deploying_refuses_the_launch(
    admin_client: Client, tiny_model: LocalModel, fake_runtime: EngineRuntime, no_kick: Any, cleanup: Any
) -> None:
    act = reverse("models_catalog:act", args=[tiny_model.pk, "allow-remote-code"])
    admin_client.post(act, {"allow": "1"})
    assert deploy(admin_client, tiny_model, fake_runtime, extra_args="--trust-remote-code").status_code == 302
    admin_client.post(act, {"allow": "0"})  # withdrawn before the loop starts the engine
    assert not LocalModel.objects.get().allow_remote_code
    replica = until("failed")
    assert replica.last_error.startswith("Refused to start: --trust-remote-code runs code from the model")
    assert replica.pid is None and launcher.our_processes(settings.NODE_NAME) == {}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"trust_remote_code": True}, "asks for --trust-remote-code, which the model acme/tiny does not allow"),
        ({"extra_args": ["--trust-remote-code"]}, "--trust-remote-code runs code from the model"),
        ({"extra_args": ["--host", "0.0.0.0"]}, "--host is not an allowed vLLM argument"),  # noqa: S104
        ({"extra_args": ["--chat-template", "/etc/passwd"]}, "--chat-template is not an allowed vLLM argument"),
    ],
)
def test_rows_that_ask_for_what_the_model_does_not_allow_are_refused_at_launch(
    tiny_model: LocalModel, fake_runtime: EngineRuntime, fields: dict[str, Any], message: str
) -> None:
    """Rows not written by the deploy form (the API, an older console, the database) are checked too."""
    replica, started = launched(make_deployment(tiny_model, fake_runtime, **fields))
    assert started == []
    assert replica.state == Replica.State.FAILED and message in replica.last_error, replica.last_error
    assert replica.last_error.startswith("Refused to start: ")


def test_remote_code_is_passed_while_the_model_allows_it(tiny_model: LocalModel, fake_runtime: EngineRuntime) -> None:
    LocalModel.objects.filter(pk=tiny_model.pk).update(allow_remote_code=True)
    model = LocalModel.objects.get(pk=tiny_model.pk)
    replica, started = launched(make_deployment(model, fake_runtime, trust_remote_code=True))
    assert replica.state == Replica.State.STARTING, replica.last_error
    assert started[0].count("--trust-remote-code") == 1
    Deployment.objects.all().delete()
    replica, started = launched(make_deployment(model, fake_runtime, extra_args=["--trust-remote-code"]))
    assert replica.state == Replica.State.STARTING, replica.last_error
    assert started[0].count("--trust-remote-code") == 1
