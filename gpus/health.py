"""Health rules after NVIDIA DCGM's health checks, over a reading and the last minute of samples.

Critical: XID 79 (fallen off the bus), 48 (double-bit ECC), 95 (uncontained memory error), 46, 62,
64, 74 (NVLink); any volatile double-bit ECC error; a row-remap failure; 63 or more retired pages;
a GPU lost from NVML. Warning: thermal or power throttling within the last minute, pending page
retirement or row remapping, more than 8 PCIe replays in a minute, temperature over the threshold,
power reading unavailable, any other XID.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gpus.models import HEALTH_ORDER, Health
from gpus.probe import THROTTLE_POWER, THROTTLE_THERMAL

CRITICAL_XIDS = {79: "fell off the bus", 48: "double-bit ECC error", 95: "uncontained memory error",
                 46: "GPU stopped processing", 62: "internal micro-controller halt",
                 64: "ECC page retirement or row remapping failure", 74: "NVLink error"}  # fmt: skip
RETIRED_PAGES_LIMIT = 63
PCIE_REPLAYS_PER_MINUTE = 8


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: Health
    message: str
    latched: bool = False  # stays open until acknowledged (events and permanent damage)


def evaluate(reading: dict[str, Any], history: Iterable[dict[str, Any]], temperature_limit: int) -> list[Finding]:
    """Findings for one GPU. ``history`` holds the samples of the last minute, oldest first, each
    with ``throttle_reasons`` and ``pcie_replay``; the current reading is counted too."""
    if reading.get("lost"):
        return [Finding("gpu_lost", Health.CRITICAL, "The GPU is lost: NVML cannot reach it (fallen off the bus?).")]
    found: list[Finding] = []
    for xid in sorted(set(reading.get("xids") or [])):
        if xid in CRITICAL_XIDS:
            found.append(Finding(f"xid_{xid}", Health.CRITICAL, f"XID {xid}: {CRITICAL_XIDS[xid]}.", latched=True))
        else:
            found.append(Finding(f"xid_{xid}", Health.WARNING, f"XID {xid} reported by the driver.", latched=True))
    if (reading.get("ecc_dbe_volatile") or 0) > 0:
        count = reading["ecc_dbe_volatile"]
        found.append(Finding("ecc_dbe", Health.CRITICAL, f"{count} volatile double-bit ECC error(s).", latched=True))
    if reading.get("remap_failure"):
        found.append(Finding("row_remap_failure", Health.CRITICAL, "Row remapping failed.", latched=True))
    retired = (reading.get("retired_pages_sbe") or 0) + (reading.get("retired_pages_dbe") or 0)
    if retired >= RETIRED_PAGES_LIMIT:
        found.append(Finding("retired_pages", Health.CRITICAL, f"{retired} retired memory pages (limit 62)."))

    window = [*history, reading]
    throttles = 0
    for sample in window:
        throttles |= sample.get("throttle_reasons") or 0
    if throttles & THROTTLE_THERMAL:
        found.append(Finding("thermal_throttle", Health.WARNING, "Thermal throttling in the last minute."))
    if throttles & THROTTLE_POWER:
        found.append(Finding("power_throttle", Health.WARNING, "Power throttling in the last minute."))
    if reading.get("retired_pages_pending") or reading.get("remap_pending"):
        found.append(
            Finding("pending_retirement", Health.WARNING, "Memory page retirement or remap pending (reset the GPU).")
        )
    replays = [s["pcie_replay"] for s in window if s.get("pcie_replay") is not None]
    if len(replays) >= 2 and replays[-1] - replays[0] > PCIE_REPLAYS_PER_MINUTE:
        found.append(
            Finding("pcie_replay", Health.WARNING, f"{replays[-1] - replays[0]} PCIe replays in the last minute.")
        )
    temperature = reading.get("temperature")
    if temperature is not None and temperature > temperature_limit:
        found.append(
            Finding("temperature", Health.WARNING, f"Temperature {temperature} °C (limit {temperature_limit} °C).")
        )
    if reading.get("power_draw") is None:
        found.append(Finding("power_unavailable", Health.WARNING, "The power reading is unavailable."))
    return found


def worst(levels: Iterable[str]) -> Health:
    result = Health.OK
    for level in levels:
        if HEALTH_ORDER[Health(level)] > HEALTH_ORDER[result]:
            result = Health(level)
    return result
