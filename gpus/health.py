"""Health rules after NVIDIA DCGM's health checks, over a reading and the last minute of samples.

Critical: XID 79 (fallen off the bus), 48 (double-bit ECC), 95 (uncontained memory error), 46, 62,
64, 74 (NVLink); any volatile double-bit ECC error; a row-remap failure; 63 or more retired pages;
a GPU lost from NVML. Warning: thermal or power throttling within the last minute, pending page
retirement or row remapping, more than 8 PCIe replays in a minute, temperature over the threshold,
power reading unavailable, any other XID.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.utils.translation import gettext, gettext_noop

from gpus.models import HEALTH_ORDER, Health
from gpus.probe import THROTTLE_POWER, THROTTLE_THERMAL

# Every finding's text is a catalogue string with named values (``gettext_noop``): stored as the text
# and its values, written in English for webhooks, logs and the API, and in the reader's language on pages.
CRITICAL_XIDS = {
    79: gettext_noop("XID 79: the GPU fell off the bus."),
    48: gettext_noop("XID 48: double-bit ECC error."),
    95: gettext_noop("XID 95: uncontained memory error."),
    46: gettext_noop("XID 46: the GPU stopped processing."),
    62: gettext_noop("XID 62: internal micro-controller halt."),
    64: gettext_noop("XID 64: ECC page retirement or row remapping failure."),
    74: gettext_noop("XID 74: NVLink error."),
}
RETIRED_PAGES_LIMIT = 63
PCIE_REPLAYS_PER_MINUTE = 8


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: Health
    text: str  # a catalogue string (gettext_noop) with %(name)s values
    params: dict[str, Any] = field(default_factory=dict)
    latched: bool = False  # stays open until acknowledged (events and permanent damage)

    @property
    def message(self) -> str:
        """The finding in English (webhooks, logs, the API)."""
        return describe(self.text, self.params, translate=False)

    def reason(self) -> dict[str, Any]:
        """What a GPU's ``health_reasons`` keeps of it: the text, its values, and the English message."""
        return {"text": self.text, "params": self.params, "message": self.message}


def describe(text: str, params: dict[str, Any] | None = None, translate: bool = True) -> str:
    """A finding's text with its values, in the active language unless ``translate`` is off. A text
    without values is used as it is (a stored message of an older version, for instance)."""
    template = gettext(text) if translate else text
    try:
        return template % params if params else template
    except (KeyError, TypeError, ValueError):
        return text


NOT_LISTED = Finding("not_listed", Health.UNKNOWN, gettext_noop("Not listed by the last sample."))


def evaluate(reading: dict[str, Any], history: Iterable[dict[str, Any]], temperature_limit: int) -> list[Finding]:
    """Findings for one GPU. ``history`` holds the samples of the last minute, oldest first, each
    with ``throttle_reasons`` and ``pcie_replay``; the current reading is counted too."""
    if reading.get("lost"):
        return [
            Finding(
                "gpu_lost",
                Health.CRITICAL,
                gettext_noop("The GPU is lost: NVML cannot reach it (fallen off the bus?)."),
            )
        ]
    found: list[Finding] = []
    for xid in sorted(set(reading.get("xids") or [])):
        if xid in CRITICAL_XIDS:
            found.append(Finding(f"xid_{xid}", Health.CRITICAL, CRITICAL_XIDS[xid], latched=True))
        else:
            text = gettext_noop("XID %(xid)s reported by the driver.")
            found.append(Finding(f"xid_{xid}", Health.WARNING, text, {"xid": xid}, latched=True))
    if (reading.get("ecc_dbe_volatile") or 0) > 0:
        count = reading["ecc_dbe_volatile"]
        text = gettext_noop("Volatile double-bit ECC errors: %(count)s.")
        found.append(Finding("ecc_dbe", Health.CRITICAL, text, {"count": count}, latched=True))
    if reading.get("remap_failure"):
        found.append(Finding("row_remap_failure", Health.CRITICAL, gettext_noop("Row remapping failed."), latched=True))
    retired = (reading.get("retired_pages_sbe") or 0) + (reading.get("retired_pages_dbe") or 0)
    if retired >= RETIRED_PAGES_LIMIT:
        text = gettext_noop("%(count)s retired memory pages (limit %(limit)s).")
        found.append(
            Finding("retired_pages", Health.CRITICAL, text, {"count": retired, "limit": RETIRED_PAGES_LIMIT - 1})
        )

    window = [*history, reading]
    throttles = 0
    for sample in window:
        throttles |= sample.get("throttle_reasons") or 0
    if throttles & THROTTLE_THERMAL:
        found.append(
            Finding("thermal_throttle", Health.WARNING, gettext_noop("Thermal throttling in the last minute."))
        )
    if throttles & THROTTLE_POWER:
        found.append(Finding("power_throttle", Health.WARNING, gettext_noop("Power throttling in the last minute.")))
    if reading.get("retired_pages_pending") or reading.get("remap_pending"):
        found.append(
            Finding(
                "pending_retirement",
                Health.WARNING,
                gettext_noop("Memory page retirement or remap pending (reset the GPU)."),
            )
        )
    replays = [s["pcie_replay"] for s in window if s.get("pcie_replay") is not None]
    if len(replays) >= 2 and replays[-1] - replays[0] > PCIE_REPLAYS_PER_MINUTE:
        found.append(
            Finding(
                "pcie_replay",
                Health.WARNING,
                gettext_noop("%(count)s PCIe replays in the last minute."),
                {"count": replays[-1] - replays[0]},
            )
        )
    temperature = reading.get("temperature")
    if temperature is not None and temperature > temperature_limit:
        found.append(
            Finding(
                "temperature",
                Health.WARNING,
                gettext_noop("Temperature %(value)s °C (limit %(limit)s °C)."),
                {"value": temperature, "limit": temperature_limit},
            )
        )
    if reading.get("power_draw") is None:
        found.append(Finding("power_unavailable", Health.WARNING, gettext_noop("The power reading is unavailable.")))
    return found


def worst(levels: Iterable[str]) -> Health:
    result = Health.OK
    for level in levels:
        if HEALTH_ORDER[Health(level)] > HEALTH_ORDER[result]:
            result = Health(level)
    return result
