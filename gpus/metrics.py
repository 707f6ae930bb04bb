"""Prometheus exposition with DCGM-exporter metric names and labels, so existing Grafana
dashboards work. Values come from each GPU's latest reading; simulated GPUs carry
``simulated="true"``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gpus.models import HEALTH_ORDER, Gpu, Health

MiB = 1024 * 1024
# (DCGM name, help, function of the latest reading)
GAUGES: list[tuple[str, str, Any]] = [
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda r: r.get("util_gpu")),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", lambda r: r.get("util_mem")),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", lambda r: _mib(r.get("mem_used"))),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", lambda r: _free(r)),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda r: r.get("temperature")),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda r: r.get("power_draw")),
    ("DCGM_FI_DEV_POWER_MGMT_LIMIT", "Power management limit (in W).", lambda r: r.get("power_limit")),
    ("DCGM_FI_DEV_FAN_SPEED", "Fan speed (in %).", lambda r: r.get("fan")),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", lambda r: r.get("sm_clock")),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", lambda r: r.get("mem_clock")),
    ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "Current clock throttle reasons (bitmask).", lambda r: r.get("throttle_reasons")),
    ("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", lambda r: (r.get("xids") or [None])[-1]),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Total volatile single-bit ECC errors.", lambda r: r.get("ecc_sbe_volatile")),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Total volatile double-bit ECC errors.", lambda r: r.get("ecc_dbe_volatile")),
    ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "Total aggregate single-bit ECC errors.", lambda r: r.get("ecc_sbe_aggregate")),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "Total aggregate double-bit ECC errors.", lambda r: r.get("ecc_dbe_aggregate")),
    ("DCGM_FI_DEV_RETIRED_SBE", "Total pages retired for single-bit errors.", lambda r: r.get("retired_pages_sbe")),
    ("DCGM_FI_DEV_RETIRED_DBE", "Total pages retired for double-bit errors.", lambda r: r.get("retired_pages_dbe")),
    ("DCGM_FI_DEV_RETIRED_PENDING", "Pages pending retirement.", lambda r: _flag(r.get("retired_pages_pending"))),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Rows remapped for correctable errors.", lambda r: r.get("remap_correctable")),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Rows remapped for uncorrectable errors.", lambda r: r.get("remap_uncorrectable")),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "Whether remapping of rows has failed.", lambda r: _flag(r.get("remap_failure"))),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "Total PCIe replays.", lambda r: r.get("pcie_replay")),
]  # fmt: skip
LABELS = ["gpu", "UUID", "device", "modelName", "Hostname", "pci_bus_id", "simulated"]


def _mib(value: int | None) -> float | None:
    return value / MiB if value is not None else None


def _free(reading: dict[str, Any]) -> float | None:
    total, used = reading.get("mem_total"), reading.get("mem_used")
    return _mib(total - used) if total is not None and used is not None else None


def _flag(value: bool | None) -> int | None:
    return None if value is None else int(value)


class GpuCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        gpus = list(Gpu.objects.all())
        families = {name: GaugeMetricFamily(name, text, labels=LABELS) for name, text, _ in GAUGES}
        health = GaugeMetricFamily(
            "console_gpu_health", "Console health of the GPU: 0 ok, 1 unknown, 2 warning, 3 critical.", labels=LABELS
        )
        for gpu in gpus:
            labels = [str(gpu.index), gpu.uuid, f"nvidia{gpu.index}", gpu.name, gpu.node, gpu.pci_bus_id,
                      "true" if gpu.simulated else "false"]  # fmt: skip
            if not gpu.latest.get("lost"):
                for name, _, value_of in GAUGES:
                    value = value_of(gpu.latest)
                    if value is not None:
                        families[name].add_metric(labels, float(value))
            health.add_metric(labels, HEALTH_ORDER[Health(gpu.health)])
        yield from families.values()
        yield health
