"""The node sweep (beat, every few seconds): nodes whose heartbeat stopped become unreachable."""

from __future__ import annotations

from celery import shared_task

from nodes.registry import sweep


@shared_task(name="nodes.sweep")
def sweep_nodes() -> list[str]:
    return sweep()
