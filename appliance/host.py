"""Facts of the machine this process runs on, read from Linux."""

from __future__ import annotations

from pathlib import Path


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes: ``MemTotal``, ``MemAvailable``, …"""
    values: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _sep, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0]) * 1024
    return values
