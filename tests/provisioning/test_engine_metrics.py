"""Engine metrics: vLLM's /metrics parsed (old and new names), rates and percentiles from the
difference of two scrapes, samples collected from a FAKE engine exposing vLLM's metrics through
prometheus_client, rolled up, and drawn on the deployment page (the real engine's names are checked
in tests/engine/test_vllm.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from django.urls import reverse
from django.utils import timezone

from provisioning import engine_metrics
from provisioning.engine_metrics import Reading, derive, parse, quantile
from provisioning.models import EngineSample, Replica
from tests.gateway.helpers import FakeEngineProcess

NEW = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="m"} %(prompt)s
vllm:generation_tokens_total{model_name="m"} %(generated)s
vllm:prefix_cache_hits_total{model_name="m"} %(hits)s
vllm:prefix_cache_queries_total{model_name="m"} %(queries)s
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} %(b1)s
vllm:time_to_first_token_seconds_bucket{le="0.5",model_name="m"} %(b2)s
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} %(b3)s
vllm:time_to_first_token_seconds_count{model_name="m"} %(b3)s
vllm:time_to_first_token_seconds_sum{model_name="m"} 1.0
"""
OLD = """vllm:gpu_cache_usage_perc{model_name="m"} 0.75
vllm:time_per_output_token_seconds_bucket{le="0.05",model_name="m"} 4.0
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="m"} 4.0
"""


def exposition(**values: float) -> str:
    base = {"prompt": 100, "generated": 50, "hits": 10, "queries": 40, "b1": 0, "b2": 0, "b3": 0}
    return NEW % (base | values)


def test_parse_reads_the_engines_names_and_tolerates_old_and_missing_ones() -> None:
    reading = parse(exposition(), at=1000.0)
    assert reading.values["running"] == 4.0 and reading.values["waiting"] == 2.0  # summed over engines
    assert reading.values["kv_cache"] == 0.5  # the fullest engine
    assert reading.values["prompt_tokens"] == 100 and "preemptions" not in reading.values
    old = parse(OLD)
    assert old.values["kv_cache"] == 0.75 and set(old.buckets) == {"itl"}
    assert parse("").values == {} and Reading.loads(reading.dumps()) == reading
    other = "# HELP vllm:iteration_tokens_total x\n# TYPE vllm:iteration_tokens_total histogram\n" + "".join(
        f'vllm:iteration_tokens_total_bucket{{le="{le}",model_name="m"}} 3.0\n' for le in (1, 8, 64, "+Inf")
    )
    assert parse(other + exposition(), at=1000.0) == reading  # what is not read is dropped before parsing
    with pytest.raises(ValueError):
        parse("this is not { an exposition")


def test_rates_and_percentiles_come_from_the_difference_of_two_scrapes() -> None:
    before = parse(exposition(b1=10, b2=10, b3=10), at=1000.0)
    # 10 s later: 200 prompt and 100 generated tokens; 100 new requests: 50 under 0.1 s, 40 in
    # 0.1–0.5 s, 10 beyond.
    now = parse(exposition(prompt=300, generated=150, hits=30, queries=60, b1=60, b2=100, b3=110), at=1010.0)
    sample = derive(before, now)
    assert sample["prompt_tps"] == 20.0 and sample["generation_tps"] == 10.0
    assert sample["prefix_hit_rate"] == pytest.approx(20 / 20)
    assert sample["ttft_p50"] == pytest.approx(0.1)  # rank 50 is the last of the first bucket
    assert sample["ttft_p99"] == pytest.approx(0.5)  # past the last finite bound: that bound
    assert quantile(0.75, {0.1: 0, 0.5: 0, float("inf"): 0}, {0.1: 50, 0.5: 100, float("inf"): 100}) == pytest.approx(
        0.3
    )
    assert derive(None, now)["ttft_p50"] is None and derive(None, now)["running"] == 4.0  # a first scrape
    assert derive(before, parse(exposition(b1=10, b2=10, b3=10), at=1010.0))["ttft_p50"] is None  # nothing new
    restarted = derive(now, parse(exposition(prompt=5, generated=1, b1=1, b2=1, b3=1), at=1020.0))
    assert restarted["prompt_tps"] is None and restarted["ttft_p50"] is None  # counters went down: no rate


@pytest.mark.django_db(transaction=True)
def test_collect_stores_a_sample_per_ready_replica_and_the_page_draws_it(
    deployment_factory: Any, admin_client: Any, settings: Any, redis_db: Any
) -> None:
    engine = FakeEngineProcess(key="metrics-secret", first_delay=0.03).start()
    try:
        deployment = deployment_factory(name="chat")
        replica = Replica(deployment=deployment, ordinal=0, node=settings.NODE_NAME, port=engine.port, state="ready")
        replica.set_key(engine.key)
        replica.save()
        Replica.objects.create(deployment=deployment, ordinal=1, node=settings.NODE_NAME, port=1, state="starting")
        assert engine_metrics.collect() == 1  # the starting replica is not asked
        for _ in range(3):
            httpx.post(f"{engine.url}/v1/completions", json={"model": "chat", "prompt": "hello", "max_tokens": 4},
                       headers={"Authorization": f"Bearer {engine.key}"})  # fmt: skip
        assert engine_metrics.collect() == 1
        first, second = EngineSample.objects.order_by("pk")
        assert first.generation_tps is None and first.running == 0.0 and first.kv_cache == 0.0
        assert second.generation_tps > 0 and second.prompt_tps > 0
        assert 0.02 <= second.ttft_p50 <= 0.04  # the fake engine's 30 ms first-token delay
    finally:
        engine.kill()
    assert engine_metrics.collect() == 0  # an engine that does not answer: no sample, no error

    chart = admin_client.get(reverse("provisioning:engine-chart", args=["chat"]), {"metric": "ttft", "range": "1h"})
    lines = {line["label"]: line["points"] for line in chart.json()["series"]}
    assert chart.json()["unit"] == "ms" and 20 <= lines["p50"][0][1] <= 40
    throughput = admin_client.get(reverse("provisioning:engine-chart", args=["chat"]), {"metric": "throughput"})
    assert {line["label"] for line in throughput.json()["series"]} == {"generated", "prompt"}
    for bad in ({"metric": "nope"}, {"metric": "ttft", "range": "1y"}):
        assert admin_client.get(reverse("provisioning:engine-chart", args=["chat"]), bad).status_code == 400
    assert admin_client.get(reverse("provisioning:engine-chart", args=["gone"]), {"metric": "ttft"}).status_code == 404
    page = admin_client.get(reverse("provisioning:detail", args=["chat"])).content.decode()
    assert 'data-testid="engine-charts"' in page and "Time to first token" in page


@pytest.mark.django_db
def test_engine_samples_roll_up_per_replica(deployment_factory: Any, settings: Any) -> None:
    deployment = deployment_factory(name="chat")
    replica = Replica.objects.create(deployment=deployment, ordinal=0, node=settings.NODE_NAME, state="ready")
    start = timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=3)
    EngineSample.objects.bulk_create([
        EngineSample(deployment=deployment, replica=replica, time=start + timedelta(seconds=s), running=r,
                     preemptions=1, ttft_p99=t)
        for s, r, t in ((0, 2, 0.1), (20, 4, 0.3), (40, 6, None))
    ])  # fmt: skip
    made = engine_metrics.rollup()
    assert made["minute"] == 1
    minute = EngineSample.objects.get(resolution="minute")
    assert minute.running == 4.0 and minute.preemptions == 3 and minute.ttft_p99 == pytest.approx(0.2)
    settings.GPU_RETENTION_RAW_HOURS = 1
    EngineSample.objects.filter(resolution="raw").update(time=start - timedelta(hours=2))
    assert engine_metrics.prune()["raw"] == 3


@pytest.mark.django_db
def test_the_api_gives_the_same_charts(deployment_factory: Any, admin_user: Any, client: Any, settings: Any) -> None:
    from appliance.models import ApiToken

    deployment = deployment_factory(name="chat")
    replica = Replica.objects.create(deployment=deployment, ordinal=0, node=settings.NODE_NAME, state="ready")
    EngineSample.objects.create(deployment=deployment, replica=replica, time=timezone.now(), running=2, waiting=1)
    _, raw = ApiToken.issue(admin_user, "t")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {raw}"}
    url = f"/api/v1/deployments/{deployment.pk}/engine-metrics"
    body = client.get(url, **auth).json()
    assert {line["label"]: line["points"][0][1] for line in body["series"]} == {"running": 2.0, "waiting": 1.0}
    assert client.get(url, {"chart": "nope"}, **auth).status_code == 422
    assert client.get(url, {"range": "1y"}, **auth).status_code == 422
    assert client.get(f"/api/v1/deployments/{deployment.pk + 99}/engine-metrics", **auth).status_code == 404


@pytest.mark.django_db
def test_the_gateway_chart_gives_each_departments_ttft_p50_and_p99(deployment_factory: Any, admin_client: Any) -> None:
    from tenancy.models import Department, UsageRecord

    chat, other = deployment_factory(name="chat"), deployment_factory(name="other")
    research, marketing = Department.objects.create(name="Research"), Department.objects.create(name="Marketing")
    now = timezone.now().replace(second=30, microsecond=0)
    rows = [(research, chat, 200, float(ms)) for ms in range(1, 101)]  # 1..100 ms: p50 50, p99 99
    rows += [(marketing, chat, 200, 400.0), (marketing, chat, 200, 600.0)]
    rows += [(marketing, chat, 429, 5.0), (marketing, other, 200, 9000.0), (research, chat, 200, None)]
    UsageRecord.objects.bulk_create([
        UsageRecord(stream_id=f"s{i}", created_at=now, department=department, deployment=deployment, model="m",
                    endpoint="chat", status=status, ttft_ms=ttft)
        for i, (department, deployment, status, ttft) in enumerate(rows)
    ])  # fmt: skip
    UsageRecord.objects.create(stream_id="old", created_at=now - timedelta(hours=2), department=research,
                               deployment=chat, model="m", endpoint="chat", status=200, ttft_ms=7000.0)  # fmt: skip
    chart = admin_client.get(reverse("provisioning:engine-chart", args=["chat"]), {"metric": "gateway_ttft"}).json()
    lines = {line["label"]: [value for _at, value in line["points"]] for line in chart["series"]}
    # Refused requests, other deployments, requests with no first token and the older hour are left out.
    assert lines == {"Marketing p50": [400.0], "Marketing p99": [600.0], "Research p50": [50.0], "Research p99": [99.0]}
    assert chart["unit"] == "ms"
    day_chart = admin_client.get(
        reverse("provisioning:engine-chart", args=["chat"]), {"metric": "gateway_ttft", "range": "24h"}
    )
    day = {line["label"]: line["points"] for line in day_chart.json()["series"]}
    assert [value for _at, value in day["Research p50"]] == [7000.0, 50.0]  # two quarter-hours, in time order
