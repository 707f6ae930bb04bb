"""Device check (run by hand on a machine with an NVIDIA GPU; not collected by pytest): the real
``NvmlProbe`` over the real driver, every field read or named missing, and the time one sample
takes. Needs only ``pynvml`` (nvidia-ml-py) on the path, not Django.

    PYTHONPATH=.:var/device python3 tests/gpus/device_check.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from gpus.probe import NvmlProbe


def main() -> int:
    probe = NvmlProbe()
    probe.start()
    readings = probe.sample()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        probe.sample()
        times.append((time.perf_counter() - start) * 1000)
    probe.shutdown()
    for reading in readings:
        print(json.dumps(asdict(reading), default=str))
    problems = [f"gpu {r.index}: {m}" for r in readings for m in r.missing if ":" in m]  # errors, not "unsupported"
    print(json.dumps({"gpus": len(readings), "sample_ms_median": round(statistics.median(times), 2),
                      "sample_ms_max": round(max(times), 2), "errors": problems}))  # fmt: skip
    return 1 if problems or not readings or any(r.lost for r in readings) else 0


if __name__ == "__main__":
    sys.exit(main())
