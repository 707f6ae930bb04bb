"""Deployment targets: set on the page and through the API (bad values refused, nothing saved), checked
against the engines' samples (open, seen again, resolved, as GPU alerts; webhooks get each event),
acknowledged, exported on /metrics, shown on the Overview; and the shipped Grafana dashboard and
Prometheus rules name only metrics the console exports."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from appliance.models import ApiToken
from gpus.models import Webhook, WebhookDelivery
from provisioning import targets
from provisioning.models import Deployment, EngineSample, Replica, TargetAlert

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db


@pytest.fixture
def chat(deployment_factory: Any, settings: Any) -> Deployment:
    deployment = deployment_factory(name="chat", target_ttft_p99_ms=100, target_max_waiting=5,
                                    target_kv_cache_percent=90)  # fmt: skip
    for ordinal in (0, 1):
        Replica.objects.create(deployment=deployment, ordinal=ordinal, node=settings.NODE_NAME, state="ready")
    return deployment


def sample(deployment: Deployment, ordinal: int, seconds_ago: float = 5, **values: float) -> None:
    replica = deployment.replica_set.get(ordinal=ordinal)
    EngineSample.objects.create(deployment=deployment, replica=replica,
                                time=timezone.now() - timedelta(seconds=seconds_ago), **values)  # fmt: skip


def test_a_deployment_past_a_target_opens_an_alert_until_it_is_within(chat: Deployment) -> None:
    Webhook.objects.create(name="ops", url="https://hooks.example.com/x")
    sample(chat, 0, ttft_p99=0.05, waiting=2, kv_cache=0.5)
    sample(chat, 1, ttft_p99=0.30, waiting=1, kv_cache=0.2)  # the worst replica counts for latency
    sample(chat, 1, seconds_ago=600, ttft_p99=9.0)  # outside the window: forgotten
    assert targets.observed(chat) == {"ttft_p99": 300.0, "waiting": 3.0, "kv_cache": 50.0}
    opened = targets.check(chat)
    assert [(a.target, a.value, a.limit) for a in opened] == [("ttft_p99", 300.0, 100.0)]
    delivery = WebhookDelivery.objects.get()
    assert delivery.alert is None and delivery.event == "opened"
    assert delivery.payload["kind"] == "deployment_target" and delivery.payload["deployment"]["name"] == "chat"
    assert "300ms past its target 100ms" in delivery.payload["alert"]["message"]

    sample(chat, 0, seconds_ago=1, waiting=4)  # the latest of each replica, added up: 4 + 2 = 6 > 5
    sample(chat, 1, seconds_ago=1, waiting=2)
    assert {a.target for a in targets.check(chat)} == {"ttft_p99", "waiting"}
    assert TargetAlert.objects.get(target="ttft_p99").occurrences == 2  # one alert, seen again

    EngineSample.objects.all().delete()
    sample(chat, 0, ttft_p99=0.05, waiting=0)
    assert targets.check(chat) == []
    assert not TargetAlert.objects.filter(resolved_at__isnull=True).exists() and TargetAlert.objects.count() == 2
    assert sorted(WebhookDelivery.objects.values_list("event", flat=True)) == ["opened", "opened", "resolved",
                                                                               "resolved"]  # fmt: skip
    # A target removed: its open alert resolves at the next check.
    sample(chat, 0, kv_cache=0.99)
    assert [a.target for a in targets.check(chat)] == ["kv_cache"]
    Deployment.objects.filter(pk=chat.pk).update(target_kv_cache_percent=None)
    chat.refresh_from_db()
    assert targets.check(chat) == []


def test_targets_are_set_on_the_page_and_bad_ones_change_nothing(
    admin_client: Any, viewer_user: Any, client: Any, chat: Deployment
) -> None:
    act = reverse("provisioning:act", args=["chat", "targets"])
    good = {"target_ttft_p99_ms": "250", "target_itl_p99_ms": "", "target_max_waiting": "8",
            "target_kv_cache_percent": "95"}  # fmt: skip
    page = admin_client.post(act, good, follow=True).content.decode()
    assert "Targets of chat saved" in page
    chat.refresh_from_db()
    assert (chat.target_ttft_p99_ms, chat.target_itl_p99_ms, chat.target_max_waiting) == (250, None, 8)
    for bad, text in (({"target_kv_cache_percent": "150"}, "1 to 100"), ({"target_ttft_p99_ms": "0"}, "0 would"),
                      ({"target_max_waiting": "-3"}, "greater than or equal to 0"),
                      ({"target_ttft_p99_ms": "fast"}, "whole number")):  # fmt: skip
        page = admin_client.post(act, good | bad, follow=True).content.decode()
        assert text in page, bad
        chat.refresh_from_db()
        assert (chat.target_ttft_p99_ms, chat.target_kv_cache_percent) == (250, 95), bad
    sample(chat, 0, ttft_p99=1.0)
    targets.check(chat)
    page = admin_client.get(reverse("provisioning:detail", args=["chat"])).content.decode()
    assert "past its target" in page and "p99 time to first token (ms): 1000 against 250" in page
    admin_client.post(reverse("provisioning:act", args=["chat", "acknowledge"]))
    alert = TargetAlert.objects.get()
    assert alert.acknowledged_at is not None and alert.resolved_at is None  # seen, still past
    overview = admin_client.get(reverse("dashboard:overview")).content.decode()
    assert 'data-testid="busiest"' in overview and "past: p99 time to first token (ms)" in overview
    client.force_login(viewer_user)
    assert client.post(act, good).status_code == 403


def test_targets_through_the_api(admin_user: Any, client: Any, chat: Deployment) -> None:
    _, raw = ApiToken.issue(admin_user, "t")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {raw}"}
    url = f"/api/v1/deployments/{chat.pk}/targets"
    body = {"target_ttft_p99_ms": 400, "target_itl_p99_ms": 50, "target_max_waiting": None,
            "target_kv_cache_percent": None}  # fmt: skip
    answer = client.put(url, json.dumps(body), content_type="application/json", **auth)
    assert answer.status_code == 200 and answer.json()["target_itl_p99_ms"] == 50
    for bad, status in (({"target_kv_cache_percent": 101}, 400), ({"target_ttft_p99_ms": "400"}, 422),
                        ({"target_ttft_p99_ms": True}, 422), ({"target_ttft_p99_ms": 0}, 400)):  # fmt: skip
        assert client.put(url, json.dumps(body | bad), content_type="application/json", **auth).status_code == status
    chat.refresh_from_db()
    assert (chat.target_ttft_p99_ms, chat.target_itl_p99_ms) == (400, 50)
    sample(chat, 0, itl_p99=0.2)
    targets.check(chat)
    alerts = client.get(f"/api/v1/deployments/{chat.pk}/target-alerts", **auth).json()
    assert [(a["target"], a["value"], a["limit"]) for a in alerts] == [("itl_p99", 200.0, 50.0)]
    done = client.post(f"/api/v1/deployments/{chat.pk}/target-alerts/acknowledge", **auth).json()
    assert done == {"acknowledged": 1}


def test_metrics_export_engines_and_targets(client: Any, settings: Any, chat: Deployment) -> None:
    settings.METRICS_TOKEN = "s3cret-metrics"
    sample(chat, 0, running=3, ttft_p99=0.5, kv_cache=0.25)
    targets.check(chat)
    text = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-metrics").content.decode()
    node = settings.NODE_NAME
    assert f'console_engine_requests_running{{deployment="chat",node="{node}",replica="0"}} 3.0' in text
    assert f'console_engine_kv_cache_usage_ratio{{deployment="chat",node="{node}",replica="0"}} 0.25' in text
    assert 'console_deployment_target{deployment="chat",target="ttft_p99"} 100.0' in text
    assert 'console_deployment_target_breached{deployment="chat",target="ttft_p99"} 1.0' in text
    assert 'console_deployment_target_breached{deployment="chat",target="waiting"} 0.0' in text


def test_the_shipped_dashboard_and_rules_use_only_exported_metrics(client: Any, settings: Any) -> None:
    settings.METRICS_TOKEN = "s3cret-metrics"
    text = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-metrics").content.decode()
    exported = set(re.findall(r"^# (?:HELP|TYPE) (\S+)", text, re.M))
    exported |= {f"{name}{suffix}" for name in set(exported) for suffix in ("_total", "_bucket", "_sum", "_count")}
    shipped = (ROOT / "ops" / "grafana-dashboard.json").read_text() + (
        ROOT / "ops" / "prometheus-rules.yml"
    ).read_text()
    referenced = set(re.findall(r"\b((?:console|gateway)_[a-z0-9_]+|DCGM_FI_[A-Z0-9_]+)\b", shipped))
    assert len(referenced) >= 12
    assert referenced - exported == set()
    json.loads((ROOT / "ops" / "grafana-dashboard.json").read_text())  # well-formed
