"""The deploy form as an admin meets it: GPUs as boxes to tick, and a memory panel that says, for the
values in the form, what a replica needs and whether it fits in what the box has free. And the
deployment list's columns: where to call it, how many replicas answer, since when, its traffic."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from gpus.collect import collect
from gpus.models import Gpu
from gpus.probe import SimulatedProbe
from provisioning.models import Deployment, EngineRuntime, Replica
from tests.provisioning.test_units import idle

pytestmark = pytest.mark.django_db
GiB = 1024**3


def _box(used: dict[int, int] | None = None) -> None:
    """gpubox with 4 GPUs of 80 GiB, 1 GiB used each unless ``used`` says otherwise (GiB)."""
    collect(SimulatedProbe(4), "gpubox")
    idle("gpubox")
    for index, gib in (used or {}).items():
        gpu = Gpu.objects.get(node="gpubox", index=index)
        gpu.latest = {**gpu.latest, "mem_used": gib * GiB}
        gpu.save()


def test_gpus_are_choices_with_their_free_memory_and_ticked_ones_are_used(
    admin_client: Any, tiny_model: Any, gpu_runtime: EngineRuntime
) -> None:
    _box()
    page = admin_client.get(reverse("provisioning:deploy"), {"model": tiny_model.pk}).content.decode()
    assert 'type="checkbox" name="gpu_ids" value="3"' in page
    assert "GPU 3 · 79.0\xa0GB free of 80.0\xa0GB · Healthy" in page
    form = {"model": tiny_model.pk, "name": "ticked", "runtime": gpu_runtime.pk, "replicas": 1,
            "tensor_parallel": 2, "gpu_ids": ["1", "3"], "gpu_memory_fraction": 0.5}  # fmt: skip
    response = admin_client.post(reverse("provisioning:deploy"), form)
    assert response.status_code == 302, response.content.decode()[-2000:]
    assert Deployment.objects.get(name="ticked").gpu_ids == [1, 3]
    # The same count check as before: two ticked for a tensor parallel size of one is refused, nothing saved.
    response = admin_client.post(reverse("provisioning:deploy"), form | {"name": "wrong", "tensor_parallel": 1})
    assert response.status_code == 400 and "exactly as many GPUs" in response.content.decode()
    assert not Deployment.objects.filter(name="wrong").exists()


def test_the_memory_panel_says_what_fits(admin_client: Any, tiny_model: Any, gpu_runtime: EngineRuntime) -> None:
    _box(used={0: 70, 1: 70})  # GPUs 0 and 1 nearly full, 2 and 3 idle
    url = reverse("provisioning:deploy-memory")
    query = {"model": tiny_model.pk, "runtime": gpu_runtime.pk, "gpu_memory_fraction": 0.5, "tensor_parallel": 1}
    panel = admin_client.get(url, query | {"gpu_ids": "2"}).content.decode()
    assert "It fits." in panel and "wants 40.0\xa0GB, 79.0\xa0GB free of 80.0\xa0GB" in panel
    panel = admin_client.get(url, query | {"gpu_ids": "0"}).content.decode()
    assert "does not fit" in panel and "Fewer GPUs have this fraction free (0) than a replica needs (1)." in panel
    # Nothing ticked: every healthy GPU is shown; two fit, so a tensor parallel size of 3 does not.
    panel = admin_client.get(url, query | {"tensor_parallel": 3}).content.decode()
    assert panel.count('class="room"') == 2 and panel.count('class="room short"') == 2
    assert "Fewer GPUs have this fraction free (2) than a replica needs (3)." in panel


def test_the_memory_panel_compares_the_estimate_with_the_reserved_memory(
    admin_client: Any, tiny_model: Any, gpu_runtime: EngineRuntime
) -> None:
    _box()
    facts = tiny_model.facts() | {"layers": 80, "kv_heads": 8, "head_dim": 128, "context_length": 131072}
    tiny_model.facts = lambda: facts  # not saved: the panel reads the model again
    from provisioning import capacity

    result = capacity.check(tiny_model, gpu_runtime, fraction=0.2, context=131072, tensor_parallel=1)
    assert result.need and result.need > 16 * GiB, "16 sequences of 128k tokens at 320 KiB a token"
    assert any("The model needs about" in problem for problem in result.problems)
    assert capacity.check(tiny_model, gpu_runtime, fraction=0.2, context=1024).enough


def test_the_memory_panel_on_the_cpu_engine_reads_this_boxs_memory(
    admin_client: Any, tiny_model: Any, fake_runtime: EngineRuntime
) -> None:
    query = {"model": tiny_model.pk, "runtime": fake_runtime.pk, "gpu_memory_fraction": 0.1}
    panel = admin_client.get(reverse("provisioning:deploy-memory"), query).content.decode()
    assert f"Memory of {settings.NODE_NAME}" in panel and "It fits." in panel
    panel = admin_client.get(reverse("provisioning:deploy-memory"), query | {"gpu_memory_fraction": 1}).content.decode()
    assert "need more than is free" in panel


@pytest.mark.parametrize(
    ("query", "text"),
    [({}, "Choose a model and an engine"), ({"model": "x", "runtime": "1"}, "Choose a model and an engine"),
     ({"gpu_memory_fraction": "7"}, "between 0.01 and 1"), ({"gpu_memory_fraction": "nan"}, "between 0.01 and 1")],
)  # fmt: skip
def test_the_memory_panel_with_values_it_cannot_use_says_what_is_missing(
    admin_client: Any, tiny_model: Any, fake_runtime: EngineRuntime, query: dict, text: str
) -> None:
    base = {"model": tiny_model.pk, "runtime": fake_runtime.pk} if "model" not in query and query else {}
    response = admin_client.get(reverse("provisioning:deploy-memory"), base | query)
    assert response.status_code == 200 and text in response.content.decode()


def test_the_list_shows_state_ready_replicas_uptime_and_traffic(
    admin_client: Any, tiny_model: Any, fake_runtime: EngineRuntime
) -> None:
    from tenancy.models import ApiKey, Department, UsageRollup

    deployment = Deployment.objects.create(name="listed", model=tiny_model, runtime=fake_runtime,
                                           node=fake_runtime.node, replicas=2)  # fmt: skip
    ready_at = timezone.now() - timedelta(hours=3, minutes=5)
    Replica.objects.create(deployment=deployment, ordinal=0, node=deployment.node, state="ready", ready_at=ready_at)
    Replica.objects.create(deployment=deployment, ordinal=1, node=deployment.node, state="starting")
    department = Department.objects.create(name="Finance")
    key, _raw = ApiKey.issue(department, "k")
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for start, tokens in ((hour, 1_000), (hour - timedelta(hours=5), 234_000), (hour - timedelta(days=2), 9_999)):
        UsageRollup.objects.create(period="hour", start=start, department=department, api_key=key, model="listed",
                                   prompt_tokens=tokens, completion_tokens=0)  # fmt: skip
    page = admin_client.get(reverse("provisioning:list")).content.decode()
    assert 'data-state="ready">Ready</span>' in page
    assert "<td>1 / 2</td>" in page
    assert "3\xa0hours, 5\xa0minutes" in page
    assert "<td>235,000</td>" in page  # the last 24 hours only
    assert 'id="gateway-url">http://testserver/v1</code>' in page


def test_a_starting_replica_shows_the_engines_current_step_to_admins(
    admin_client: Any, viewer_user: Any, tiny_model: Any, fake_runtime: EngineRuntime, tmp_path: Any
) -> None:
    from django.test import Client

    log = tmp_path / "engine.log"
    log.write_text("INFO 12-03 19:17:58 [api_server.py:1] vLLM API server version 0.32.0\n"
                   "\x1b[1;36m(EngineCore pid=12)\x1b[0;0m INFO 12-03 19:18:00 [loader.py:123] Loading weights took "
                   "1.20 seconds\n\n")  # fmt: skip
    deployment = Deployment.objects.create(name="warming", model=tiny_model, runtime=fake_runtime,
                                           node=fake_runtime.node)  # fmt: skip
    Replica.objects.create(deployment=deployment, ordinal=0, node=deployment.node, state="starting",
                           started_at=timezone.now(), log_path=str(log))  # fmt: skip
    url = reverse("provisioning:detail", args=["warming"])
    assert '<span class="muted phase"' in admin_client.get(url).content.decode()
    assert "Loading weights took 1.20 seconds</span>" in admin_client.get(url).content.decode()
    viewer = Client()
    viewer.force_login(viewer_user)
    assert "Loading weights" not in viewer.get(url).content.decode()  # engine logs are admins' only
