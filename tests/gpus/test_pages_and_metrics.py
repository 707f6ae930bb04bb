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

    admin_client.post(reverse("gpus:webhook-create"), {"name": "x", "url": "not a url"})
    assert not Webhook.objects.exists()


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
