"""Prometheus exposition of what the engines report (their latest sample per replica) and of the
deployments' targets, beside the GPU and gateway metrics on ``/metrics``. The Grafana dashboard and
alert rules in ``ops/`` use exactly these names."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from provisioning.models import Deployment, EngineSample, TargetAlert
from provisioning.targets import limits

# (exported name, help, sample field, scale to the unit the name says)
ENGINE_GAUGES = [
    ("console_engine_requests_running", "Requests the engine is running.", "running", 1.0),
    ("console_engine_requests_waiting", "Requests waiting in the engine's queue.", "waiting", 1.0),
    ("console_engine_kv_cache_usage_ratio", "Share of the engine's KV cache in use (0-1).", "kv_cache", 1.0),
    ("console_engine_prompt_tokens_per_second", "Prompt tokens per second.", "prompt_tps", 1.0),
    ("console_engine_generation_tokens_per_second", "Generated tokens per second.", "generation_tps", 1.0),
    ("console_engine_prefix_cache_hit_ratio", "Prefix-cache hits per query (0-1).", "prefix_hit_rate", 1.0),
    ("console_engine_time_to_first_token_p50_seconds", "Median time to first token.", "ttft_p50", 1.0),
    ("console_engine_time_to_first_token_p99_seconds", "p99 time to first token.", "ttft_p99", 1.0),
    ("console_engine_inter_token_latency_p99_seconds", "p99 inter-token latency.", "itl_p99", 1.0),
    ("console_engine_queue_time_p99_seconds", "p99 time waiting in the engine's queue.", "queue_p99", 1.0),
    ("console_engine_request_latency_p99_seconds", "p99 request latency, end to end.", "e2e_p99", 1.0),
]
LABELS = ["deployment", "replica", "node"]


class EngineCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {name: GaugeMetricFamily(name, text, labels=LABELS) for name, text, _f, _s in ENGINE_GAUGES}
        seen: set[int] = set()  # the newest sample of each ready replica
        rows = (
            EngineSample.objects.filter(resolution="raw", replica__state="ready")
            .select_related("replica", "deployment")
            .order_by("-time")[:5000]
        )
        for sample in rows:
            if sample.replica_id in seen:
                continue
            seen.add(sample.replica_id)
            labels = [sample.deployment.name, str(sample.replica.ordinal), sample.replica.node]
            for name, _text, field, scale in ENGINE_GAUGES:
                value = getattr(sample, field)
                if value is not None:
                    families[name].add_metric(labels, value * scale)
        yield from families.values()

        target = GaugeMetricFamily("console_deployment_target", "A deployment's service target (ms, requests, %).",
                                   labels=["deployment", "target"])  # fmt: skip
        past = GaugeMetricFamily("console_deployment_target_breached", "1 while the deployment is past the target.",
                                 labels=["deployment", "target"])  # fmt: skip
        open_alerts = set(TargetAlert.objects.filter(resolved_at__isnull=True).values_list("deployment_id", "target"))
        for deployment in Deployment.objects.all():
            for key, limit in limits(deployment).items():
                target.add_metric([deployment.name, key], limit)
                past.add_metric([deployment.name, key], 1.0 if (deployment.pk, key) in open_alerts else 0.0)
        yield target
        yield past
