"""One collection on a node: sample the probe, store raw samples, evaluate health, sync alerts."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from gpus.alerts import sync_alerts
from gpus.health import NOT_LISTED, evaluate
from gpus.models import Gpu, GpuSample, Health, NodeProbe, SimulatedFault
from gpus.probe import GpuProbe, NvmlProbe, ProbeUnavailable, SimulatedProbe

_probe: GpuProbe | None = None


def _simulated_faults() -> list[dict[str, Any]]:
    faults = list(SimulatedFault.objects.filter(node=settings.NODE_NAME))
    SimulatedFault.objects.filter(pk__in=[f.pk for f in faults if f.once]).delete()
    return [{"gpu": f.gpu_index, "kind": f.kind, "value": f.value} for f in faults]


def _simulated_processes() -> dict[int, list[dict[str, int]]]:
    """This node's running GPU users (engines) as the simulated GPUs' processes, so the GPUs page
    names the replica behind each one as it does with NVML: on the GPUs it was placed on, or, for
    one placed on none (the CPU engine), on GPU slot modulo the count."""
    from gpus.users import users

    running: dict[int, list[dict[str, int]]] = {}
    for user in users(settings.NODE_NAME):
        if not user.running or user.pid is None:
            continue
        memory = int(user.memory_fraction * SimulatedProbe.MEMORY)
        for index in user.gpus or [user.slot % settings.GPU_SIMULATED_COUNT]:
            running.setdefault(index, []).append({"pid": user.pid, "memory": memory})
    return running


def get_probe() -> GpuProbe:
    """This process's probe, as the GPU_SOURCE setting says (kept: NVML's event set must persist)."""
    global _probe
    if _probe is None:
        if settings.GPU_SOURCE == "simulated":
            _probe = SimulatedProbe(
                settings.GPU_SIMULATED_COUNT, faults=_simulated_faults, processes=_simulated_processes
            )
        else:
            _probe = NvmlProbe()
    return _probe


def reset_probe() -> None:
    global _probe
    _probe = None


def _add_process_groups(readings: list[Any]) -> None:
    """Each GPU process's process group: an engine's workers share the group of the replica's
    process, which is how the GPUs page names the deployment behind a PID."""
    for reading in readings:
        for process in reading.processes:
            try:
                process["pgid"] = os.getpgid(process["pid"])
            except (ProcessLookupError, PermissionError):
                process["pgid"] = None


def collect(probe: GpuProbe | None = None, node: str | None = None) -> dict[str, Any]:
    """Sample every GPU of this node once and record it; returns a summary."""
    probe = probe or get_probe()
    node = node or settings.NODE_NAME
    source = "simulated" if probe.simulated else "nvml"
    started = time.perf_counter()
    try:
        readings = probe.sample()
    except ProbeUnavailable as exc:
        NodeProbe.objects.update_or_create(
            node=node, defaults={"source": source, "ok": False, "error": str(exc), "sampled_at": timezone.now()}
        )
        return {"ok": False, "error": str(exc)}
    sample_ms = (time.perf_counter() - started) * 1000
    _add_process_groups(readings)
    now = timezone.now()
    window_start = now - timedelta(seconds=60)
    with transaction.atomic():
        seen = []
        samples = []
        for reading in readings:
            data = reading.as_dict()
            gpu, _ = Gpu.objects.update_or_create(
                uuid=reading.uuid,
                defaults={
                    "node": node,
                    "index": reading.index,
                    "name": reading.name or "",
                    "serial": reading.serial or "",
                    "pci_bus_id": reading.pci_bus_id or "",
                    "simulated": probe.simulated,
                    "latest": data,
                    "last_seen": now,
                },
            )
            seen.append(gpu.pk)
            history = list(
                gpu.samples.filter(resolution=GpuSample.Resolution.RAW, time__gte=window_start)
                .order_by("time")
                .values("throttle_reasons", "pcie_replay")
            )
            findings = evaluate(data, history, settings.GPU_TEMPERATURE_WARNING_C)
            health = sync_alerts(gpu, findings)
            Gpu.objects.filter(pk=gpu.pk).update(health=health, health_reasons=[f.reason() for f in findings])
            if not reading.lost:
                samples.append(
                    GpuSample(
                        gpu=gpu,
                        time=now,
                        util_gpu=reading.util_gpu,
                        mem_used=reading.mem_used,
                        temperature=reading.temperature,
                        power_draw=reading.power_draw,
                        sm_clock=reading.sm_clock,
                        throttle_reasons=reading.throttle_reasons,
                        pcie_replay=reading.pcie_replay,
                        ecc_dbe_volatile=reading.ecc_dbe_volatile,
                        xid_count=len(reading.xids),
                    )
                )
        GpuSample.objects.bulk_create(samples)
        # GPUs this node had before but NVML no longer lists: unknown, never silently healthy.
        Gpu.objects.filter(node=node).exclude(pk__in=seen).update(
            health=Health.UNKNOWN, health_reasons=[NOT_LISTED.reason()]
        )
        NodeProbe.objects.update_or_create(
            node=node,
            defaults={"source": source, "ok": True, "error": "", "sampled_at": now, "sample_ms": sample_ms},
        )
    return {"ok": True, "gpus": len(readings), "sample_ms": sample_ms}
