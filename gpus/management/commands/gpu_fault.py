"""Inject a fault into the SIMULATED GPU source (demos and tests only)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from gpus.models import SimulatedFault

KINDS = ("xid", "ecc_dbe", "overheat", "pcie_replay", "lost", "clear")


class Command(BaseCommand):
    help = "Inject a fault into the simulated GPUs: xid, ecc_dbe, overheat, pcie_replay, lost (or clear)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("kind", choices=KINDS)
        parser.add_argument("--gpu", type=int, default=0)
        parser.add_argument("--value", type=int, help="XID number, error count, temperature or replays")
        parser.add_argument("--keep", action="store_true", help="apply to every sample until cleared")

    def handle(self, *args: Any, kind: str, gpu: int, value: int | None, keep: bool, **options: Any) -> None:
        if settings.GPU_SOURCE != "simulated":
            raise CommandError("Faults can only be injected into the simulated source (GPU_SOURCE=simulated).")
        if kind == "clear":
            SimulatedFault.objects.filter(node=settings.NODE_NAME).delete()
            self.stdout.write("Cleared.")
            return
        if not 0 <= gpu < settings.GPU_SIMULATED_COUNT:
            count = settings.GPU_SIMULATED_COUNT
            raise CommandError(f"There are {count} simulated GPUs: use --gpu 0 to {count - 1}.")
        SimulatedFault.objects.create(node=settings.NODE_NAME, gpu_index=gpu, kind=kind, value=value, once=not keep)
        self.stdout.write(f"Injected {kind} on simulated GPU {gpu}.")
