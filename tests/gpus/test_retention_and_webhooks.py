"""Downsampling and retention; webhook deliveries with retries against a local HTTP receiver."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gpus.alerts import notify
from gpus.models import Alert, Gpu, GpuSample, Webhook, WebhookDelivery
from gpus.retention import prune, rollup
from gpus.tasks import deliver_webhook

pytestmark = pytest.mark.django_db
R = GpuSample.Resolution


@pytest.fixture
def gpu() -> Gpu:
    return Gpu.objects.create(node="box", index=0, uuid="GPU-x", name="test")


def test_rollup_minute_and_hour(gpu: Gpu) -> None:
    start = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
    for second in range(0, 7200, 5):  # two hours of raw samples every 5 s
        GpuSample.objects.create(
            gpu=gpu, time=start + timedelta(seconds=second), util_gpu=second % 60, temperature=50,
            pcie_replay=second, xid_count=1 if second == 65 else 0,
        )  # fmt: skip
    made = rollup(now=start + timedelta(hours=2, seconds=1))
    assert made == {"minute": 120, "hour": 2}
    minute = GpuSample.objects.get(resolution=R.MINUTE, time=start + timedelta(minutes=1))
    assert minute.util_gpu == pytest.approx(27.5)  # mean of 0, 5, …, 55
    assert minute.pcie_replay == 115 and minute.xid_count == 1  # counters keep their maximum; xids add up
    hour = GpuSample.objects.get(resolution=R.HOUR, time=start)
    assert hour.temperature == 50 and hour.xid_count == 1
    # Idempotent: nothing new until another bucket completes.
    assert rollup(now=start + timedelta(hours=2, seconds=30)) == {"minute": 0, "hour": 0}


def test_incomplete_bucket_waits(gpu: Gpu) -> None:
    start = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
    GpuSample.objects.create(gpu=gpu, time=start + timedelta(seconds=10), util_gpu=1)
    assert rollup(now=start + timedelta(seconds=30))["minute"] == 0
    assert rollup(now=start + timedelta(seconds=61))["minute"] == 1


def test_retention(gpu: Gpu, settings: Any) -> None:
    now = datetime(2026, 11, 20, tzinfo=UTC)
    for resolution, age in [(R.RAW, timedelta(hours=25)), (R.RAW, timedelta(hours=23)),
                            (R.MINUTE, timedelta(days=8)), (R.MINUTE, timedelta(days=6)),
                            (R.HOUR, timedelta(days=91)), (R.HOUR, timedelta(days=89))]:  # fmt: skip
        GpuSample.objects.create(gpu=gpu, resolution=resolution, time=now - age)
    assert prune(now) == {"raw": 1, "minute": 1, "hour": 1}
    assert GpuSample.objects.count() == 3


class Receiver:
    """A local HTTP receiver that fails the first ``failures`` POSTs with 503."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.failures > 0:
                    receiver.failures -= 1
                    self.send_response(503)
                else:
                    receiver.received.append(body)
                    self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def settings_fast(settings: Any) -> Any:
    settings.WEBHOOK_RETRY_BASE_SECONDS = 0
    settings.WEBHOOK_ATTEMPTS = 4
    return settings


def _alert(gpu: Gpu) -> Alert:
    return Alert.objects.create(gpu=gpu, rule="xid_79", severity="critical", message="XID 79", latched=True)


def test_webhook_retried_until_delivered(gpu: Gpu, settings_fast: Any, django_capture_on_commit_callbacks: Any) -> None:
    receiver = Receiver(failures=2)
    Webhook.objects.create(name="ops", url=receiver.url)
    with django_capture_on_commit_callbacks() as callbacks:
        notify(_alert(gpu), "opened")
    delivery = WebhookDelivery.objects.get()
    assert len(callbacks) == 1
    result = deliver_webhook.apply(args=[delivery.pk])  # eager: the retries run in place
    assert result.get() == "sent"
    delivery.refresh_from_db()
    assert delivery.status == "sent" and delivery.attempts == 3
    assert receiver.received[0]["event"] == "opened" and receiver.received[0]["gpu"]["uuid"] == "GPU-x"
    receiver.server.shutdown()


def test_webhook_failure_is_visible(gpu: Gpu, settings_fast: Any) -> None:
    receiver = Receiver(failures=99)
    Webhook.objects.create(name="ops", url=receiver.url)
    notify(_alert(gpu), "opened")
    delivery = WebhookDelivery.objects.get()
    assert deliver_webhook.apply(args=[delivery.pk]).get() == "failed"
    delivery.refresh_from_db()
    assert delivery.status == "failed" and delivery.attempts == 4 and "503" in delivery.last_error
    receiver.server.shutdown()


def test_webhook_unreachable(gpu: Gpu, settings_fast: Any) -> None:
    Webhook.objects.create(name="gone", url="http://127.0.0.1:9/hook")
    notify(_alert(gpu), "opened")
    delivery = WebhookDelivery.objects.get()
    assert deliver_webhook.apply(args=[delivery.pk]).get() == "failed"
    delivery.refresh_from_db()
    assert "ConnectError" in delivery.last_error
