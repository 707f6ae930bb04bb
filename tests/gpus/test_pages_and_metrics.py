"""The GPUs page, chart data, the Overview summary and /metrics (parsed back by prometheus_client)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

from appliance.models import AuditEvent
from gpus.collect import _simulated_processes, collect
from gpus.models import Alert, Gpu
from gpus.probe import NvmlProbe, SimulatedProbe
from tests.gpus.fake_nvml import FakeNvml

pytestmark = pytest.mark.django_db


def test_metrics_need_the_token(client: Client, settings: Any) -> None:
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 403
    settings.METRICS_TOKEN = "s3cret-metrics"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401


def test_metrics_use_dcgm_names_and_labels(client: Client, settings: Any) -> None:
    settings.METRICS_TOKEN = "s3cret-metrics"
    collect(NvmlProbe(FakeNvml(gpus=2, unsupported={"fan"})), node="gpu-box-1")
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-metrics")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.content.decode())}
    util = families["DCGM_FI_DEV_GPU_UTIL"].samples
    assert [(s.labels["gpu"], s.labels["UUID"], s.labels["Hostname"], s.value) for s in util] == [
        ("0", "GPU-fake-0", "gpu-box-1", 50.0), ("1", "GPU-fake-1", "gpu-box-1", 51.0)]  # fmt: skip
    assert families["DCGM_FI_DEV_FB_USED"].samples[0].value == 10 * 1024
    assert families["DCGM_FI_DEV_FB_FREE"].samples[0].value == 70 * 1024
    assert families["DCGM_FI_DEV_POWER_USAGE"].samples[0].value == 350.0
    assert families["DCGM_FI_DEV_FAN_SPEED"].samples == []  # unsupported: absent, not zero
    assert util[0].labels["simulated"] == "false"
    assert {"DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_XID_ERRORS", "console_gpu_health"} <= set(families)


def test_simulated_metrics_are_marked(client: Client, settings: Any) -> None:
    settings.METRICS_TOKEN = "t" * 16
    collect(SimulatedProbe(count=1), node="demo")
    text = client.get("/metrics", HTTP_AUTHORIZATION="Bearer " + "t" * 16).content.decode()
    assert 'simulated="true"' in text


def test_gpus_page_tiles_alerts_and_simulated_banner(admin_client: Client) -> None:
    collect(SimulatedProbe(count=2, faults=lambda: [{"gpu": 1, "kind": "xid", "value": 79}]), node="demo")
    html = admin_client.get(reverse("gpus:list")).content.decode()
    assert "SIMULATED" in html and "XID 79" in html and "demo · GPU 1" in html
    assert "chart-4.6.1.umd.min.js" in html
    alert = Alert.objects.get()
    admin_client.post(reverse("gpus:alert-ack", args=[alert.pk]))
    assert not Alert.objects.get().is_open
    assert AuditEvent.objects.filter(action="gpu_alert.acknowledge").exists()


def test_nvml_failure_shown_plainly(admin_client: Client) -> None:
    import pynvml

    collect(NvmlProbe(FakeNvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)), node="cpu-box")
    html = admin_client.get(reverse("gpus:list")).content.decode()
    assert "No GPU data from cpu-box" in html and "Driver Not Loaded" in html
    assert "NVML could not start" in admin_client.get("/").content.decode()


def test_chart_data(admin_client: Client) -> None:
    collect(SimulatedProbe(count=2), node="demo")
    data = admin_client.get(reverse("gpus:chart"), {"range": "1h", "metric": "temperature"}).json()
    assert data["unit"] == "°C" and [s["label"] for s in data["series"]] == ["demo GPU 0", "demo GPU 1"]
    assert len(data["series"][0]["points"]) == 1
    assert admin_client.get(reverse("gpus:chart"), {"range": "1y"}).status_code == 400
    assert admin_client.get(reverse("gpus:chart"), {"metric": "password"}).status_code == 400


def test_viewer_cannot_ack_or_add_webhooks(viewer_client: Client) -> None:
    collect(SimulatedProbe(count=1, faults=lambda: [{"gpu": 0, "kind": "xid"}]), node="demo")
    alert = Alert.objects.get()
    assert viewer_client.post(reverse("gpus:alert-ack", args=[alert.pk])).status_code == 403
    assert viewer_client.post(reverse("gpus:webhook-create"), {"name": "x", "url": "http://a"}).status_code == 403
    assert Alert.objects.get().is_open


def test_webhook_form_refuses_bad_url(admin_client: Client) -> None:
    from gpus.models import Webhook

    response = admin_client.post(reverse("gpus:webhook-create"), {"name": "x", "url": "not a url"})
    assert response.status_code == 400 and not Webhook.objects.exists()
    assert list(response.context["webhook_form"].errors) == ["url"]  # shown next to its field
    page = response.content.decode()
    assert 'value="x"' in page and page.index('id="id_url"') < page.index("Enter a valid URL.")
    added = admin_client.post(reverse("gpus:webhook-create"), {"name": "ops", "url": "https://hooks.example.com/a"},
                              follow=True)  # fmt: skip
    assert "Webhook ops added" in added.content.decode() and Webhook.objects.count() == 1


def test_overview_summary(admin_client: Client) -> None:
    collect(SimulatedProbe(count=3, faults=lambda: [{"gpu": 0, "kind": "ecc_dbe"}]), node="demo")
    html = admin_client.get("/").content.decode()
    assert "2 of 3 GPUs healthy" in html and "1 critical" in html
    assert Gpu.objects.filter(health="critical").count() == 1


def test_simulated_gpus_list_the_running_replicas(admin_client: Client, deployment_factory: Any, settings: Any) -> None:
    from provisioning.models import Replica

    settings.GPU_SIMULATED_COUNT = 2
    tiny = deployment_factory("tiny", gpu_memory_fraction=0.25)
    Replica.objects.create(deployment=tiny, ordinal=0, node=settings.NODE_NAME, state="ready", pid=os.getpid())
    Replica.objects.create(deployment=tiny, ordinal=1, node=settings.NODE_NAME, state="stopped")
    big = deployment_factory("big", gpu_memory_fraction=0.5)
    Replica.objects.create(deployment=big, ordinal=0, node=settings.NODE_NAME, state="starting", pid=1, gpu_ids=[1])
    collect(SimulatedProbe(count=2, processes=_simulated_processes))
    gpus = {gpu.index: gpu.latest["processes"] for gpu in Gpu.objects.all()}
    # A CPU engine (no GPU placed) on GPU ordinal % count; a placed one on its GPUs; stopped ones nowhere.
    assert gpus[0] == [{"pid": os.getpid(), "memory": 20 * 1024**3, "pgid": os.getpgid(0)}]
    assert [p["pid"] for p in gpus[1]] == [1]
    html = admin_client.get(reverse("gpus:list")).content.decode()
    assert "tiny#0" in html and "big#0" in html and "tiny#1" not in html


def test_acknowledging_says_who_and_when_and_resolved_alerts_come_newest_first(admin_client: Client,
                                                                                admin_user: Any) -> None:  # fmt: skip
    from datetime import timedelta

    from django.utils import timezone

    collect(SimulatedProbe(count=2, faults=lambda: [{"gpu": 0, "kind": "xid"}]), node="demo")
    alert = Alert.objects.get()
    page = admin_client.post(reverse("gpus:alert-ack", args=[alert.pk]), follow=True).content.decode()
    assert "Alert acknowledged and resolved" in page  # a latched event resolves when seen
    assert f"acknowledged by {admin_user.username} at" in page
    gpu = alert.gpu
    now = timezone.now()
    for hours, rule in ((5, "older"), (1, "newer"), (3, "middle")):
        Alert.objects.create(gpu=gpu, rule=rule, severity="warning", message=f"{rule} one",
                             resolved_at=now - timedelta(hours=hours))  # fmt: skip
    resolved = [a.rule for a in admin_client.get(reverse("gpus:list")).context["recent_alerts"]]
    assert resolved[:3] == [alert.rule, "newer", "middle"] and resolved[3] == "older"


def test_a_page_per_gpu_with_its_readings_what_runs_on_it_its_charts_and_alerts(
    admin_client: Client, deployment_factory: Any
) -> None:
    from provisioning.models import Replica

    collect(SimulatedProbe(count=2, faults=lambda: [{"gpu": 1, "kind": "xid", "value": 79}]), node="demo")
    gpu = Gpu.objects.get(index=1)
    deployment = deployment_factory(name="on-gpu-one")
    Replica.objects.create(deployment=deployment, ordinal=0, node="demo", gpu_ids=[1], state="ready")
    tiles = admin_client.get(reverse("gpus:tiles")).content.decode()
    assert f'href="{reverse("gpus:detail", args=[gpu.pk])}"' in tiles
    page = admin_client.get(reverse("gpus:detail", args=[gpu.pk])).content.decode()
    assert "demo · GPU 1" in page and gpu.uuid in page and "XID 79: the GPU fell off the bus." in page
    assert "on-gpu-one" in page and f'data-gpu="{gpu.pk}"' in page
    # Its charts hold its own series only; an unknown GPU is refused.
    data = admin_client.get(reverse("gpus:chart"), {"metric": "temperature", "gpu": gpu.pk}).json()
    assert [s["label"] for s in data["series"]] == ["demo GPU 1"]
    assert admin_client.get(reverse("gpus:chart"), {"metric": "temperature", "gpu": 999999}).status_code == 400
    assert admin_client.get(reverse("gpus:detail", args=[999999])).status_code == 404
    # Acknowledging from its page comes back to it.
    alert = Alert.objects.get(gpu=gpu)
    response = admin_client.post(reverse("gpus:alert-ack", args=[alert.pk]),
                                 {"next": reverse("gpus:detail", args=[gpu.pk])})  # fmt: skip
    assert response["Location"] == reverse("gpus:detail", args=[gpu.pk])


def test_a_critical_tile_says_why_after_the_event_has_passed(admin_client: Client) -> None:
    """An XID is an event: the next samples no longer carry it, but its alert (and the GPU's critical
    health) stays until acknowledged, and the tile names it."""
    faults = [[{"gpu": 0, "kind": "xid", "value": 48}]]
    collect(SimulatedProbe(count=1, faults=lambda: faults[0]), node="demo")
    faults[0] = []
    collect(SimulatedProbe(count=1, faults=lambda: faults[0]), node="demo")
    gpu = Gpu.objects.get()
    assert gpu.health == "critical"
    tiles = admin_client.get(reverse("gpus:tiles")).content.decode()
    assert "XID 48: double-bit ECC error." in tiles


def test_the_header_shows_open_alerts_to_those_who_see_gpus(admin_client: Client, dept_admin_user: Any) -> None:
    assert "alert-count" not in admin_client.get(reverse("dashboard:overview")).content.decode()
    collect(SimulatedProbe(count=2, faults=lambda: [{"gpu": 1, "kind": "xid", "value": 79}]), node="demo")
    page = admin_client.get(reverse("dashboard:overview")).content.decode()
    assert 'class="badge bad alert-count" title="1 open GPU alert">1</span>' in page
    other = Client()
    other.force_login(dept_admin_user)  # a department role does not see GPUs, nor their alerts
    assert "alert-count" not in other.get(reverse("tenancy:list")).content.decode()


def test_alert_texts_are_in_the_readers_language_and_english_for_machines(admin_client: Client, settings: Any) -> None:
    from gpus.models import Webhook, WebhookDelivery

    Webhook.objects.create(name="ops", url="https://hooks.example.com/ops")
    collect(SimulatedProbe(count=1, faults=lambda: [{"gpu": 0, "kind": "xid", "value": 79}]), node="demo")
    admin_client.cookies[settings.LANGUAGE_COOKIE_NAME] = "zh-hans"
    page = admin_client.get(reverse("gpus:list")).content.decode()
    assert "XID 79：GPU 已从总线掉线。" in page and "告警产生" in page  # the alert, and the delivery's event
    assert "fell off the bus" not in page
    delivery = WebhookDelivery.objects.get()
    assert delivery.payload["alert"]["message"] == "XID 79: the GPU fell off the bus."
    gpu = Gpu.objects.get()
    assert gpu.english_reasons == ["XID 79: the GPU fell off the bus."]
