"""The node sweep (beat, every second): nodes whose heartbeat stopped become unreachable."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from nodes.registry import sweep


@shared_task(name="nodes.sweep")
def sweep_nodes() -> list[str]:
    # The box running this sweep is alive, whatever its heartbeat row says (a slow database write).
    return sweep(spare=settings.NODE_NAME)
