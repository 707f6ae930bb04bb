"""Celery tasks of provisioning: the reconcile loop per node and runtime installs."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from appliance.jobs import run_job
from appliance.worker import alive_workers
from provisioning import engine_metrics, scheduler
from provisioning import reconcile as loop
from provisioning.models import Replica, RuntimeJob
from provisioning.runtimes import install


@shared_task(name="provisioning.reconcile_all", ignore_result=True)
def reconcile_all() -> int:
    """Beat runs on one box: it places the replicas of deployments on any box, then each node's
    engines are handled by that node's own worker."""
    scheduler.schedule()
    nodes = set(alive_workers().values()) | scheduler.nodes_with_work()
    for node in nodes:
        reconcile_node.apply_async(queue=f"node.{node}", expires=settings.RECONCILE_SECONDS * 2)
    return len(nodes)


@shared_task(name="provisioning.scrape_all", ignore_result=True)
def scrape_all() -> int:
    """Each node reads its own engines (they are on its loopback)."""
    nodes = set(Replica.objects.filter(state=Replica.State.READY).values_list("node", flat=True).distinct())
    for node in nodes:
        scrape_node.apply_async(queue=f"node.{node}", expires=settings.ENGINE_METRICS_SECONDS * 2)
    return len(nodes)


@shared_task(name="provisioning.scrape_node", ignore_result=True)
def scrape_node() -> int:
    return engine_metrics.collect()


@shared_task(name="provisioning.rollup_engine_samples", ignore_result=True)
def rollup_engine_samples() -> dict:
    return {"rolled": engine_metrics.rollup(), "pruned": engine_metrics.prune()}


@shared_task(name="provisioning.reconcile_node", ignore_result=True)
def reconcile_node() -> dict:
    return loop.reconcile()


@shared_task(name="provisioning.watch_startup", ignore_result=True)
def watch_startup(replica_id: int, pid: int) -> str:
    return loop.watch_startup(replica_id, pid)


@shared_task(name="provisioning.run_runtime_job", bind=True, acks_late=True)
def run_runtime_job(self, job_id: int) -> str:
    return run_job(RuntimeJob, job_id, install, worker=self.request.hostname or "")
