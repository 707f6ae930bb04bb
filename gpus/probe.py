"""Reading GPUs: ``NvmlProbe`` over nvidia-ml-py, and ``SimulatedProbe`` for demos and tests.

A probe returns one ``GpuReading`` per GPU. A field the GPU does not support is left as None and
named in ``missing``; it never breaks the sample. A GPU that falls off the bus mid-sample is
returned with ``lost=True``. Which probe runs is an explicit setting (``GPU_SOURCE``): there is no
silent fallback from NVML to simulated numbers.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any, Protocol


class ProbeUnavailable(Exception):
    """The source cannot start (no driver, no NVML library); the message is NVML's reason."""


@dataclass
class GpuReading:
    index: int
    uuid: str
    name: str = ""
    serial: str | None = None
    pci_bus_id: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    util_gpu: int | None = None
    util_mem: int | None = None
    mem_used: int | None = None  # bytes
    mem_total: int | None = None
    temperature: int | None = None  # °C
    power_draw: float | None = None  # W
    power_limit: float | None = None
    fan: int | None = None  # %
    sm_clock: int | None = None  # MHz
    mem_clock: int | None = None
    throttle_reasons: int | None = None  # NVML bitmask
    ecc_sbe_volatile: int | None = None
    ecc_dbe_volatile: int | None = None
    ecc_sbe_aggregate: int | None = None
    ecc_dbe_aggregate: int | None = None
    retired_pages_sbe: int | None = None
    retired_pages_dbe: int | None = None
    retired_pages_pending: bool | None = None
    remap_correctable: int | None = None
    remap_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    pcie_replay: int | None = None
    nvlink_up: int | None = None
    nvlink_total: int | None = None
    processes: list[dict[str, int]] = field(default_factory=list)
    xids: list[int] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    lost: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# NVML throttle reasons that mean heat or power (nvmlClocksEventReason*).
THROTTLE_POWER = 0x4 | 0x80 | 0x100  # SW power cap, HW slowdown, HW power brake
THROTTLE_THERMAL = 0x20 | 0x40  # SW thermal, HW thermal


class GpuProbe(Protocol):
    simulated: bool

    def start(self) -> None: ...

    def sample(self) -> list[GpuReading]: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlProbe:
    """The real probe. ``nvml`` is the ``pynvml`` module (tests pass a fake with the same names)."""

    simulated = False

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        self.started = False
        self.event_set: Any = None
        self.handles: dict[str, Any] = {}

    def start(self) -> None:
        try:
            self.nvml.nvmlInit()
        except self.nvml.NVMLError as exc:
            raise ProbeUnavailable(f"NVML could not start: {exc}") from None
        except OSError as exc:  # the library is there but cannot be loaded
            raise ProbeUnavailable(f"NVML could not start: {exc}") from None
        self.started = True
        try:
            self.event_set = self.nvml.nvmlEventSetCreate()
        except self.nvml.NVMLError:
            self.event_set = None  # no XID events on this system; the sample still works

    def shutdown(self) -> None:
        if self.started:
            try:
                self.nvml.nvmlShutdown()
            finally:
                self.started = False

    def _get(self, reading: GpuReading, name: str, call: Callable[[], Any]) -> Any:
        """One NVML field: None (and named in ``missing``) when unsupported; GpuIsLost propagates."""
        try:
            return call()
        except self.nvml.NVMLError_GpuIsLost:
            raise
        except self.nvml.NVMLError as exc:
            reading.missing.append(name if isinstance(exc, self.nvml.NVMLError_NotSupported) else f"{name}: {exc}")
            return None

    def _register_events(self, uuid: str, handle: Any) -> None:
        if self.event_set is None or uuid in self.handles:
            return
        try:
            self.nvml.nvmlDeviceRegisterEvents(handle, self.nvml.nvmlEventTypeXidCriticalError, self.event_set)
        except self.nvml.NVMLError:
            pass  # this GPU cannot report XIDs (e.g. some consumer boards); health rules see no XIDs
        self.handles[uuid] = handle

    def _drain_xids(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        if self.event_set is None:
            return found
        for _ in range(1000):  # bounded: a storm of events must not stall the sample
            try:
                event = self.nvml.nvmlEventSetWait_v2(self.event_set, 0)
            except self.nvml.NVMLError:  # NVML_ERROR_TIMEOUT: nothing more
                break
            uuid = _text(self.nvml.nvmlDeviceGetUUID(event.device))
            found.setdefault(uuid, []).append(int(event.eventData))
        return found

    def sample(self) -> list[GpuReading]:
        if not self.started:
            self.start()
        nvml = self.nvml
        driver = self._system(nvml.nvmlSystemGetDriverVersion)
        cuda_raw = self._system(nvml.nvmlSystemGetCudaDriverVersion)
        cuda = f"{cuda_raw // 1000}.{cuda_raw % 1000 // 10}" if isinstance(cuda_raw, int) else None
        readings = []
        for index in range(nvml.nvmlDeviceGetCount()):
            readings.append(self._read(index, driver, cuda))
        xids = self._drain_xids()
        for reading in readings:
            reading.xids = xids.get(reading.uuid, [])
        return readings

    def _system(self, call: Callable[[], Any]) -> Any:
        try:
            value = call()
        except self.nvml.NVMLError:
            return None
        return _text(value) if isinstance(value, bytes | str) else value

    def _read(self, index: int, driver: str | None, cuda: str | None) -> GpuReading:
        nvml = self.nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except nvml.NVMLError as exc:
            return GpuReading(index=index, uuid=f"unknown-{index}", lost=True, missing=[f"handle: {exc}"])
        reading = GpuReading(index=index, uuid=uuid, driver_version=driver, cuda_version=cuda)
        try:
            self._fill(reading, handle)
        except nvml.NVMLError_GpuIsLost:
            reading.lost = True
        return reading

    def _fill(self, r: GpuReading, h: Any) -> None:
        nvml, get = self.nvml, self._get
        self._register_events(r.uuid, h)
        r.name = _text(get(r, "name", lambda: nvml.nvmlDeviceGetName(h)) or "")
        serial = get(r, "serial", lambda: nvml.nvmlDeviceGetSerial(h))
        r.serial = _text(serial) if serial is not None else None
        pci = get(r, "pci_bus_id", lambda: nvml.nvmlDeviceGetPciInfo(h))
        r.pci_bus_id = _text(pci.busId) if pci is not None else None
        util = get(r, "utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        if util is not None:
            r.util_gpu, r.util_mem = int(util.gpu), int(util.memory)
        memory = get(r, "memory", lambda: nvml.nvmlDeviceGetMemoryInfo(h))
        if memory is not None:
            r.mem_used, r.mem_total = int(memory.used), int(memory.total)
        r.temperature = get(r, "temperature", lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
        power = get(r, "power_draw", lambda: nvml.nvmlDeviceGetPowerUsage(h))
        r.power_draw = power / 1000 if power is not None else None
        limit = get(r, "power_limit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h))
        r.power_limit = limit / 1000 if limit is not None else None
        r.fan = get(r, "fan", lambda: nvml.nvmlDeviceGetFanSpeed(h))
        r.sm_clock = get(r, "sm_clock", lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))
        r.mem_clock = get(r, "mem_clock", lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM))
        r.throttle_reasons = get(r, "throttle_reasons", lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(h))
        ecc = {
            "ecc_sbe_volatile": (nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC),
            "ecc_dbe_volatile": (nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC),
            "ecc_sbe_aggregate": (nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_AGGREGATE_ECC),
            "ecc_dbe_aggregate": (nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_AGGREGATE_ECC),
        }
        for name, (kind, counter) in ecc.items():
            setattr(r, name, get(r, name, lambda k=kind, c=counter: nvml.nvmlDeviceGetTotalEccErrors(h, k, c)))
        sbe = get(r, "retired_pages_sbe", lambda: nvml.nvmlDeviceGetRetiredPages(
            h, nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS))  # fmt: skip
        r.retired_pages_sbe = len(sbe) if sbe is not None else None
        dbe = get(r, "retired_pages_dbe", lambda: nvml.nvmlDeviceGetRetiredPages(
            h, nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR))  # fmt: skip
        r.retired_pages_dbe = len(dbe) if dbe is not None else None
        pending = get(r, "retired_pages_pending", lambda: nvml.nvmlDeviceGetRetiredPagesPendingStatus(h))
        r.retired_pages_pending = bool(pending) if pending is not None else None
        remap = get(r, "row_remap", lambda: nvml.nvmlDeviceGetRemappedRows(h))
        if remap is not None:
            correctable, uncorrectable, is_pending, failure = remap
            r.remap_correctable, r.remap_uncorrectable = int(correctable), int(uncorrectable)
            r.remap_pending, r.remap_failure = bool(is_pending), bool(failure)
        r.pcie_replay = get(r, "pcie_replay", lambda: nvml.nvmlDeviceGetPcieReplayCounter(h))
        self._nvlink(r, h)
        procs = get(r, "processes", lambda: nvml.nvmlDeviceGetComputeRunningProcesses(h))
        r.processes = [{"pid": int(p.pid), "memory": int(p.usedGpuMemory or 0)} for p in procs or []]

    def _nvlink(self, r: GpuReading, h: Any) -> None:
        nvml = self.nvml
        up = total = 0
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            try:
                state = nvml.nvmlDeviceGetNvLinkState(h, link)
            except nvml.NVMLError_GpuIsLost:
                raise
            except nvml.NVMLError:
                continue  # link absent or NVLink unsupported
            total += 1
            up += 1 if state else 0
        if total:
            r.nvlink_up, r.nvlink_total = up, total
        else:
            r.missing.append("nvlink")


class SimulatedProbe:
    """FAKE GPUs for demos and tests (``GPU_SOURCE=simulated``): plausible, slowly varying numbers,
    plus faults injected with ``manage.py gpu_fault`` (XID, ECC, overheating, lost) and, as their
    processes, the engines ``processes()`` lists per GPU index (the console's running replicas)."""

    simulated = True
    NAME = "Simulated H100 80GB HBM3"
    MEMORY = 80 * 1024**3

    def __init__(
        self,
        count: int = 8,
        seed: int = 0,
        faults: Callable[[], list[dict[str, Any]]] | None = None,
        processes: Callable[[], dict[int, list[dict[str, int]]]] | None = None,
    ):
        self.count = count
        self.random = random.Random(seed)  # noqa: S311 - fake numbers, not secrets
        self.faults = faults or (lambda: [])
        self.processes = processes or (lambda: {})
        self.replays = [0] * count

    def start(self) -> None:
        return None

    def sample(self) -> list[GpuReading]:
        now = time.time()
        faults = self.faults()
        running = self.processes()
        readings = []
        for index in range(self.count):
            wave = (1 + math.sin(now / 300 + index)) / 2
            util = int(20 + 70 * wave + self.random.uniform(-5, 5))
            reading = GpuReading(
                index=index,
                uuid=f"GPU-5e1a0000-0000-4000-8000-{index:012d}",
                name=self.NAME,
                serial=f"SIM{index:09d}",
                pci_bus_id=f"00000000:{0x18 + index * 0x10:02X}:00.0",
                driver_version="sim-580.00",
                cuda_version="13.0",
                util_gpu=max(0, min(100, util)),
                util_mem=max(0, min(100, util - 10)),
                mem_total=self.MEMORY,
                mem_used=int((10 + 60 * wave) * 1024**3),
                temperature=int(35 + 35 * wave),
                power_draw=round(80 + 500 * wave * util / 100, 1),
                power_limit=700.0,
                fan=None,
                sm_clock=int(1100 + 880 * wave),
                mem_clock=2619,
                throttle_reasons=0,
                ecc_sbe_volatile=0,
                ecc_dbe_volatile=0,
                ecc_sbe_aggregate=0,
                ecc_dbe_aggregate=0,
                retired_pages_sbe=0,
                retired_pages_dbe=0,
                retired_pages_pending=False,
                remap_correctable=0,
                remap_uncorrectable=0,
                remap_pending=False,
                remap_failure=False,
                pcie_replay=self.replays[index],
                nvlink_up=18,
                nvlink_total=18,
                missing=["fan"],
                processes=list(running.get(index, [])),
            )
            for fault in faults:
                if fault["gpu"] == index:
                    self._apply(reading, fault)
            readings.append(reading)
        return readings

    def _apply(self, reading: GpuReading, fault: dict[str, Any]) -> None:
        kind, value = fault["kind"], fault.get("value")
        if kind == "xid":
            reading.xids.append(int(value or 79))
        elif kind == "ecc_dbe":
            reading.ecc_dbe_volatile = int(value or 1)
            reading.ecc_dbe_aggregate = int(value or 1)
        elif kind == "overheat":
            reading.temperature = int(value or 95)
            reading.throttle_reasons = THROTTLE_THERMAL
        elif kind == "pcie_replay":
            self.replays[reading.index] += int(value or 20)
            reading.pcie_replay = self.replays[reading.index]
        elif kind == "lost":
            reading.lost = True
