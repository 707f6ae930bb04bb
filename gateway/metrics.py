"""The gateway's Prometheus series (served on /metrics beside the GPU ones)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
LABELS = ("department", "model")
REQUESTS = Counter("gateway_requests", "Requests the gateway answered.", (*LABELS, "status"), registry=REGISTRY)
TOKENS = Counter("gateway_tokens", "Tokens billed.", (*LABELS, "kind"), registry=REGISTRY)
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT = Histogram("gateway_time_to_first_token_seconds", "Time to the first byte of the answer.", LABELS,
                 buckets=_BUCKETS, registry=REGISTRY)  # fmt: skip
LATENCY = Histogram("gateway_request_seconds", "Time to the end of the answer.", LABELS, buckets=_BUCKETS,
                    registry=REGISTRY)  # fmt: skip
# Refused before a key or a body was known (no key, unknown key, malformed): counted here by a fixed
# set of reasons, never as usage rows.
REFUSED = Counter("gateway_refused", "Requests refused before admission, by reason.", ("reason",), registry=REGISTRY)
EXCEEDED = Counter("gateway_reservation_exceeded", "Answers whose engine counts passed the reservation "
                   "(billed at the reservation).", registry=REGISTRY)  # fmt: skip
SPOOLED = Counter("gateway_settlements_spooled", "Settlements and usage entries Redis refused, kept in the spool "
                  "to be retried.", registry=REGISTRY)  # fmt: skip
OVERHEAD = Histogram("gateway_overhead_seconds", "Time the gateway itself added.", buckets=(
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1), registry=REGISTRY)  # fmt: skip


def observe(department: str, model: str, status: int, prompt: int, completion: int, ttft: float | None,
            total: float, overhead: float) -> None:  # fmt: skip
    REQUESTS.labels(department, model, str(status)).inc()
    if prompt:
        TOKENS.labels(department, model, "prompt").inc(prompt)
    if completion:
        TOKENS.labels(department, model, "completion").inc(completion)
    if ttft is not None:
        TTFT.labels(department, model).observe(ttft)
    LATENCY.labels(department, model).observe(total)
    OVERHEAD.observe(overhead)
