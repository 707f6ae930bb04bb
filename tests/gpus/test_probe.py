"""The NVML probe against a fake of pynvml: unsupported fields, a lost GPU, NVML not loadable."""

from __future__ import annotations

import pynvml
import pytest

from gpus.probe import NvmlProbe, ProbeUnavailable, SimulatedProbe
from tests.gpus.fake_nvml import FakeNvml


def test_full_reading() -> None:
    readings = NvmlProbe(FakeNvml(gpus=2)).sample()
    assert [r.uuid for r in readings] == ["GPU-fake-0", "GPU-fake-1"]
    first = readings[0]
    assert (
        first.name == "NVIDIA H100 80GB HBM3" and first.driver_version == "580.65.06" and first.cuda_version == "13.0"
    )
    assert first.util_gpu == 50 and first.mem_total == 80 * 1024**3 and first.power_draw == 350.0
    assert first.nvlink_up == first.nvlink_total == 18
    assert first.processes == [{"pid": 4242, "memory": 2 * 1024**3}]
    assert first.missing == [] and not first.lost


def test_unsupported_fields_are_missing_not_fatal() -> None:
    reading = NvmlProbe(FakeNvml(gpus=1, unsupported={"fan", "power", "nvlink", "remap"})).sample()[0]
    assert reading.fan is None and reading.power_draw is None and reading.remap_failure is None
    assert {"fan", "power_draw", "nvlink", "row_remap"} <= set(reading.missing)
    assert reading.temperature == 60  # the rest of the sample is there


def test_gpu_lost_mid_sample_is_reported_and_others_still_read() -> None:
    readings = NvmlProbe(FakeNvml(gpus=2, lost_at=(1, "memory"))).sample()
    assert not readings[0].lost and readings[0].mem_used is not None
    assert readings[1].lost
    assert readings[1].util_gpu == 51  # read before it was lost


def test_nvml_not_loadable_says_why() -> None:
    with pytest.raises(ProbeUnavailable, match=r"NVML could not start: .*Not Found"):
        NvmlProbe(FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)).sample()


def test_real_pynvml_on_this_machine_without_gpu() -> None:
    """No silent fallback: on a box without the driver the real probe refuses with NVML's reason."""
    probe = NvmlProbe()
    try:
        probe.start()
    except ProbeUnavailable as exc:
        assert "NVML" in str(exc)
    else:  # a machine with a GPU: the real probe must read it
        assert probe.sample()
        probe.shutdown()


def test_xid_events_go_to_their_gpu() -> None:
    readings = NvmlProbe(FakeNvml(gpus=2, xids=[(1, 79), (1, 13)])).sample()
    assert readings[0].xids == [] and readings[1].xids == [79, 13]


def test_simulated_probe_faults() -> None:
    faults = [{"gpu": 2, "kind": "xid", "value": 48}, {"gpu": 3, "kind": "overheat", "value": 97}]
    readings = SimulatedProbe(count=8, faults=lambda: faults).sample()
    assert len(readings) == 8 and readings[2].xids == [48] and readings[3].temperature == 97
    assert all(0 <= r.util_gpu <= 100 for r in readings)
