"""A FAKE of the pynvml functions the probe calls, for machines without a GPU. It uses pynvml's
real exception classes and constants, so the probe's error handling is exercised as on hardware."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml


def _error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # pynvml maps the code to its NVMLError_* subclass


class FakeNvml:
    def __init__(self, gpus: int = 2, unsupported: set[str] | None = None, lost_at: tuple[int, str] | None = None,
                 init_error: int | None = None, xids: list[tuple[int, int]] | None = None) -> None:  # fmt: skip
        self.gpus = gpus
        self.unsupported = unsupported or set()
        self.lost_at = lost_at  # (gpu index, function name) that raises GpuIsLost
        self.init_error = init_error
        self.events = list(xids or [])  # (gpu index, xid)
        for name in dir(pynvml):
            if name.startswith(("NVML_", "NVMLError", "nvmlEventType")) or name == "NVMLError":
                setattr(self, name, getattr(pynvml, name))

    def _check(self, name: str, handle: Any = None) -> None:
        if name in self.unsupported:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if self.lost_at and handle is not None and handle.index == self.lost_at[0] and name == self.lost_at[1]:
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise _error(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.65.06"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000

    def nvmlDeviceGetCount(self) -> int:
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return SimpleNamespace(index=index)

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        return f"GPU-fake-{h.index}"

    def nvmlDeviceGetName(self, h: Any) -> str:
        self._check("name", h)
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetSerial(self, h: Any) -> str:
        self._check("serial", h)
        return f"16520000{h.index}"

    def nvmlDeviceGetPciInfo(self, h: Any) -> Any:
        self._check("pci", h)
        return SimpleNamespace(busId=f"00000000:{h.index + 1:02X}:00.0")

    def nvmlDeviceGetUtilizationRates(self, h: Any) -> Any:
        self._check("utilization", h)
        return SimpleNamespace(gpu=50 + h.index, memory=30)

    def nvmlDeviceGetMemoryInfo(self, h: Any) -> Any:
        self._check("memory", h)
        return SimpleNamespace(used=10 * 1024**3, total=80 * 1024**3, free=70 * 1024**3)

    def nvmlDeviceGetTemperature(self, h: Any, sensor: int) -> int:
        self._check("temperature", h)
        return 60

    def nvmlDeviceGetPowerUsage(self, h: Any) -> int:
        self._check("power", h)
        return 350_000

    def nvmlDeviceGetEnforcedPowerLimit(self, h: Any) -> int:
        self._check("power_limit", h)
        return 700_000

    def nvmlDeviceGetFanSpeed(self, h: Any) -> int:
        self._check("fan", h)
        return 40

    def nvmlDeviceGetClockInfo(self, h: Any, kind: int) -> int:
        self._check("clock", h)
        return 1980 if kind == pynvml.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: Any) -> int:
        self._check("throttle", h)
        return 0

    def nvmlDeviceGetTotalEccErrors(self, h: Any, kind: int, counter: int) -> int:
        self._check("ecc", h)
        return 0

    def nvmlDeviceGetRetiredPages(self, h: Any, cause: int) -> list[int]:
        self._check("retired", h)
        return []

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: Any) -> int:
        self._check("retired", h)
        return 0

    def nvmlDeviceGetRemappedRows(self, h: Any) -> tuple[int, int, int, int]:
        self._check("remap", h)
        return (0, 0, 0, 0)

    def nvmlDeviceGetPcieReplayCounter(self, h: Any) -> int:
        self._check("pcie", h)
        return 3

    def nvmlDeviceGetNvLinkState(self, h: Any, link: int) -> int:
        self._check("nvlink", h)
        if link >= 18:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return 1

    def nvmlDeviceGetComputeRunningProcesses(self, h: Any) -> list[Any]:
        self._check("processes", h)
        return [SimpleNamespace(pid=4242, usedGpuMemory=2 * 1024**3)] if h.index == 0 else []

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlDeviceRegisterEvents(self, h: Any, types: int, event_set: Any) -> None:
        pass

    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> Any:
        if not self.events:
            raise _error(pynvml.NVML_ERROR_TIMEOUT)
        index, xid = self.events.pop(0)
        return SimpleNamespace(device=SimpleNamespace(index=index), eventData=xid)
