"""Celery tasks of GPU monitoring: per-node collection, downsampling, webhook deliveries."""

from __future__ import annotations

import httpx
from celery import shared_task
from django.conf import settings
from django.utils import timezone

from appliance.worker import alive_workers
from gpus.collect import collect
from gpus.models import WebhookDelivery
from gpus.retention import prune, rollup


@shared_task(name="gpus.collect_all", ignore_result=True)
def collect_all() -> int:
    """Beat runs on one box; each node's GPUs are read by that node's own worker."""
    nodes = set(alive_workers().values()) or {settings.NODE_NAME}
    for node in nodes:
        collect_node.apply_async(queue=f"node.{node}", expires=settings.GPU_SAMPLE_SECONDS * 2)
    return len(nodes)


@shared_task(name="gpus.collect_node", ignore_result=True)
def collect_node() -> dict:
    return collect()


@shared_task(name="gpus.rollup", ignore_result=True)
def rollup_and_prune() -> dict:
    return {"rolled": rollup(), "pruned": prune()}


@shared_task(name="gpus.deliver_webhook", bind=True, acks_late=True, max_retries=None)
def deliver_webhook(self, delivery_id: int) -> str:
    """POST one alert event; retried with capped exponential backoff up to WEBHOOK_ATTEMPTS times."""
    delivery = WebhookDelivery.objects.select_related("webhook").filter(pk=delivery_id).first()
    if delivery is None or delivery.status != WebhookDelivery.Status.PENDING:
        return "nothing to do"
    attempts = delivery.attempts + 1
    try:
        response = httpx.post(delivery.webhook.url, json=delivery.payload, timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        failed = attempts >= settings.WEBHOOK_ATTEMPTS
        WebhookDelivery.objects.filter(pk=delivery.pk).update(
            attempts=attempts,
            last_error=f"{type(exc).__name__}: {exc}"[:2000],
            status=WebhookDelivery.Status.FAILED if failed else WebhookDelivery.Status.PENDING,
        )
        if failed:
            return "failed"
        delay = min(settings.WEBHOOK_RETRY_BASE_SECONDS * 2 ** (attempts - 1), 600)
        raise self.retry(countdown=delay) from None
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        attempts=attempts, status=WebhookDelivery.Status.SENT, sent_at=timezone.now(), last_error=""
    )
    return "sent"
