"""What each ready replica's engine says of its own serving, scraped from vLLM's ``/metrics``.

The exposition is parsed with ``prometheus_client``'s parser. vLLM versions name metrics
differently (``kv_cache_usage_perc`` was ``gpu_cache_usage_perc``, ``inter_token_latency_seconds``
was ``time_per_output_token_seconds``), so each figure lists the names it accepts, newest first, and
a missing one is None rather than an error. Counters and histograms are cumulative: rates and
percentiles come from the difference with the previous scrape of the same engine (kept in Redis per
replica), so a restarted engine (counters going down) gives no rate for one period, not a wrong one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from django.conf import settings
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from prometheus_client.parser import text_string_to_metric_families

from appliance.rollup import prune as prune_samples
from appliance.rollup import rollup as rollup_samples

GAUGES = {  # field: names (summed over label sets, e.g. engines of one server)
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
}
FRACTIONS = {  # field: names (0..1, the largest of the label sets)
    "kv_cache": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:cpu_cache_usage_perc"),
}
COUNTERS = {
    "prompt_tokens": ("vllm:prompt_tokens_total",),
    "generation_tokens": ("vllm:generation_tokens_total",),
    "prefix_hits": ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
    "prefix_queries": ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
    "preemptions": ("vllm:num_preemptions_total",),
}
HISTOGRAMS = {
    "ttft": ("vllm:time_to_first_token_seconds",),
    "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    "queue": ("vllm:request_queue_time_seconds",),
    "e2e": ("vllm:e2e_request_latency_seconds",),
}
# What one sample holds, in the order charts list them.
FIELDS = ("running", "waiting", "kv_cache", "prompt_tps", "generation_tps", "prefix_hit_rate", "preemptions",
          *(f"{h}_{q}" for h in HISTOGRAMS for q in ("p50", "p99")))  # fmt: skip


@dataclass
class Reading:
    """One scrape: gauges, cumulative counters and cumulative histogram buckets (upper bound → count)."""

    at: float
    values: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)

    def dumps(self) -> str:
        buckets = {name: [[le, count] for le, count in found.items()] for name, found in self.buckets.items()}
        return json.dumps({"at": self.at, "values": self.values, "buckets": buckets})

    @classmethod
    def loads(cls, text: str | bytes) -> Reading:
        data = json.loads(text)
        buckets = {name: {float(le): count for le, count in pairs} for name, pairs in data["buckets"].items()}
        return cls(data["at"], data["values"], buckets)


# The sample names read (counters' ``_total``, histograms' ``_bucket``): the lines of any other metric
# are dropped before parsing, which is most of an engine's exposition (and of the parse's time).
WANTED = frozenset(
    [name for names in (*GAUGES.values(), *FRACTIONS.values(), *COUNTERS.values()) for name in names]
    + [f"{name}_bucket" for names in HISTOGRAMS.values() for name in names]
)


def _wanted_lines(text: str) -> str:
    """The sample lines of ``WANTED`` metrics (comments dropped: samples are read by name). When none
    is there, the whole text, so that what is not an exposition still fails to parse."""
    kept = [line for line in text.splitlines() if line[:1] not in ("", "#")
            and line.partition("{")[0].partition(" ")[0] in WANTED]  # fmt: skip
    return "\n".join(kept) + "\n" if kept else text


def parse(text: str, at: float | None = None) -> Reading:
    """The figures of one ``/metrics`` answer, by the first name each is found under."""
    values: dict[str, list[float]] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(_wanted_lines(text)):
        for sample in family.samples:
            if sample.name.endswith("_bucket") and "le" in sample.labels:
                found = buckets.setdefault(sample.name[: -len("_bucket")], {})
                le = float(sample.labels["le"])
                found[le] = found.get(le, 0.0) + sample.value
            elif not math.isnan(sample.value):
                values.setdefault(sample.name, []).append(sample.value)
    reading = Reading(time.time() if at is None else at)

    def first(names: tuple[str, ...]) -> list[float] | None:
        return next((values[name] for name in names if name in values), None)

    for name, names in {**GAUGES, **COUNTERS}.items():
        found = first(names)
        if found is not None:
            reading.values[name] = sum(found)
    for name, names in FRACTIONS.items():
        found = first(names)
        if found is not None:
            reading.values[name] = max(found)
    for name, names in HISTOGRAMS.items():
        found_buckets = next((buckets[n] for n in names if n in buckets), None)
        if found_buckets is not None:
            reading.buckets[name] = found_buckets
    return reading


def quantile(q: float, before: dict[float, float] | None, now: dict[float, float]) -> float | None:
    """The q-quantile of what was observed between two cumulative bucket readings, interpolated
    within its bucket as Prometheus' ``histogram_quantile`` does; None when nothing was observed."""
    bounds = sorted(now)
    counts = [now[le] - ((before or {}).get(le, 0.0)) for le in bounds]
    if not counts or counts[-1] <= 0 or any(c < 0 for c in counts):
        return None  # nothing new, or the engine restarted (counts went down)
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for le, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if math.isinf(le):
                return lower  # past the last finite bound: the most that can be said
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower


def derive(before: Reading | None, now: Reading) -> dict[str, float | None]:
    """One sample's figures from this scrape and the previous one of the same engine."""
    sample: dict[str, float | None] = {name: now.values.get(name) for name in (*GAUGES, *FRACTIONS)}
    seconds = now.at - before.at if before else 0.0

    def delta(name: str) -> float | None:
        if before is None or name not in now.values or name not in before.values:
            return None
        change = now.values[name] - before.values[name]
        return change if change >= 0 else None  # a restart reset the counter

    prompt, generated = delta("prompt_tokens"), delta("generation_tokens")
    sample["prompt_tps"] = prompt / seconds if prompt is not None and seconds > 0 else None
    sample["generation_tps"] = generated / seconds if generated is not None and seconds > 0 else None
    hits, queries = delta("prefix_hits"), delta("prefix_queries")
    sample["prefix_hit_rate"] = hits / queries if hits is not None and queries else None
    sample["preemptions"] = delta("preemptions")
    for name in HISTOGRAMS:
        earlier = before.buckets.get(name) if before else None
        current = now.buckets.get(name)
        for label, q in (("p50", 0.5), ("p99", 0.99)):
            sample[f"{name}_{label}"] = quantile(q, earlier, current) if current and before else None
    return sample


_scraper: dict[int, httpx.Client] = {}


def _client() -> httpx.Client:
    """This process's HTTP client for scrapes: connections kept between them. A new connection per
    scrape cost 40 ms of every one (the engine's server sends headers and body apart, and the
    first-packet delays of a fresh connection met); a kept one answers in a few ms."""
    import os

    client = _scraper.get(os.getpid())  # a worker's forked children make their own
    if client is None:
        client = _scraper[os.getpid()] = httpx.Client(limits=httpx.Limits(max_keepalive_connections=64))
    return client


def scrape(port: int, key: str, host: str = "127.0.0.1", timeout: float = 3.0) -> Reading:
    """Read one engine's ``/metrics`` (on this box: engines are on loopback). Raises httpx.HTTPError."""
    response = _client().get(f"http://{host}:{port}/metrics", headers={"Authorization": f"Bearer {key}"},
                             timeout=timeout)  # fmt: skip
    response.raise_for_status()
    return parse(response.text)


def collect(node: str | None = None, client: Any = None) -> int:
    """Scrape every ready replica of this node and store one raw sample each; returns how many."""
    from appliance.worker import redis_client
    from provisioning.models import Deployment, EngineSample, Replica

    node = node or settings.NODE_NAME
    client = client or redis_client()
    now = timezone.now()
    made = []
    for replica in Replica.objects.filter(node=node, state=Replica.State.READY, port__isnull=False):
        try:
            reading = scrape(replica.port, replica.key())
        except (httpx.HTTPError, ValueError):
            continue  # not answering: the answer check and the reconcile loop deal with that
        memory = f"console:engine-metrics:{replica.pk}"
        previous = client.get(memory)
        before = Reading.loads(previous) if previous else None
        client.set(memory, reading.dumps(), ex=max(600, settings.ENGINE_METRICS_SECONDS * 10))
        made.append(EngineSample(deployment_id=replica.deployment_id, replica=replica, time=now,
                                 **derive(before, reading)))  # fmt: skip
    EngineSample.objects.bulk_create(made)
    from provisioning import targets

    for deployment in Deployment.objects.filter(pk__in={sample.deployment_id for sample in made}):
        targets.check(deployment, now)
    return len(made)


def rollup() -> dict[str, int]:
    """Minute and hour averages of engine samples (preemptions summed), per replica."""
    from django.db.models import Avg, Sum

    from provisioning.models import EngineSample

    aggregates = {name: Sum(name) if name == "preemptions" else Avg(name) for name in FIELDS}
    return rollup_samples(EngineSample, ["deployment_id", "replica_id"], aggregates)


def prune() -> dict[str, int]:
    from datetime import timedelta

    from provisioning.models import EngineSample

    return prune_samples(EngineSample, {
        "raw": timedelta(hours=settings.GPU_RETENTION_RAW_HOURS),
        "minute": timedelta(days=settings.GPU_RETENTION_MINUTE_DAYS),
        "hour": timedelta(days=settings.GPU_RETENTION_HOUR_DAYS),
    })  # fmt: skip


# The deployment page's charts: (key, title, fields, unit, scale). One line per replica and field.
CHARTS = {
    "requests": (_("Requests running and waiting"), ("running", "waiting"), "", 1.0),
    "kv_cache": (_("KV cache used"), ("kv_cache",), "%", 100.0),
    "throughput": (_("Tokens per second"), ("generation_tps", "prompt_tps"), "tok/s", 1.0),
    "ttft": (_("Time to first token"), ("ttft_p50", "ttft_p99"), "ms", 1000.0),
    "itl": (_("Inter-token latency"), ("itl_p50", "itl_p99"), "ms", 1000.0),
    "e2e": (_("Request latency"), ("e2e_p50", "e2e_p99", "queue_p99"), "s", 1.0),
    # Not the engine's: the gateway's own time to first token, per department (usage records).
    "gateway_ttft": (_("Time to first token at the gateway, by department"), (), "ms", 1.0),
}
# The gateway chart's buckets (seconds) per range: enough requests in each for a p99.
GATEWAY_BUCKETS = {"1h": 60, "24h": 15 * 60, "7d": 3 * 3600, "30d": 12 * 3600}
FIELD_LABELS = {
    "running": _("running"), "waiting": _("waiting"), "kv_cache": _("used"), "generation_tps": _("generated"),
    "prompt_tps": _("prompt"), "ttft_p50": "p50", "ttft_p99": "p99", "itl_p50": "p50", "itl_p99": "p99",
    "e2e_p50": "p50", "e2e_p99": "p99", "queue_p99": _("queue p99"),
}  # fmt: skip


def series(deployment: Any, range_key: str, chart: str) -> dict[str, Any]:
    """``{"unit", "series": [{"label", "points": [[epoch ms, value], …]}]}`` for one chart of a
    deployment: each replica's fields over the range, at the resolution GPU charts use for it."""
    from gpus.charts import RANGES
    from provisioning.models import EngineSample

    if range_key not in RANGES or chart not in CHARTS:
        raise ValueError("Unknown range or chart.")
    if chart == "gateway_ttft":
        return gateway_ttft(deployment, range_key)
    span, resolution = RANGES[range_key]
    _title, fields, unit, scale = CHARTS[chart]
    rows = (
        EngineSample.objects.filter(deployment=deployment, resolution=resolution, time__gte=timezone.now() - span)
        .order_by("replica__ordinal", "time")
        .values_list("replica__ordinal", "time", *fields)
    )
    lines: dict[tuple[int, str], list[list[float]]] = {}
    for ordinal, moment, *values in rows.iterator(chunk_size=5000):
        for name, value in zip(fields, values, strict=True):
            points = lines.setdefault((ordinal, name), [])
            if value is not None:
                points.append([int(moment.timestamp() * 1000), round(value * scale, 3)])
    several = len({ordinal for ordinal, _name in lines}) > 1
    return {
        "unit": unit,
        "series": [
            {"label": (f"#{ordinal} " if several else "") + str(FIELD_LABELS[name]), "points": points}
            for (ordinal, name), points in lines.items()
        ],
    }


def _rank(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of sorted ``values``."""
    return values[max(0, math.ceil(q * len(values)) - 1)]


def gateway_ttft(deployment: Any, range_key: str) -> dict[str, Any]:
    """Each department's p50 and p99 time to first token as the gateway measured it (answered
    requests' usage records: what the department waited, queueing in the gateway included), per
    bucket of ``GATEWAY_BUCKETS``; the same shape as ``series``."""
    from gpus.charts import RANGES
    from tenancy.models import UsageRecord

    span, _resolution = RANGES[range_key]
    bucket = GATEWAY_BUCKETS[range_key]
    rows = (
        UsageRecord.objects.filter(
            deployment=deployment, created_at__gte=timezone.now() - span, status=200, ttft_ms__isnull=False
        )
        .order_by()
        .values_list("department__name", "created_at", "ttft_ms")
    )
    groups: dict[tuple[str, int], list[float]] = {}
    for department, moment, ttft in rows.iterator(chunk_size=5000):
        start = int(moment.timestamp()) // bucket * bucket
        groups.setdefault((department or "—", start), []).append(ttft)
    lines: dict[str, list[list[float]]] = {}
    for (department, start), values in sorted(groups.items()):
        values.sort()
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            lines.setdefault(f"{department} {name}", []).append([start * 1000, round(_rank(values, q), 1)])
    return {"unit": "ms", "series": [{"label": label, "points": points} for label, points in lines.items()]}
