"""Health rules on recorded sequences of samples, alerts open/resolve/dedupe, collection."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.management import call_command

from gpus.collect import collect, reset_probe
from gpus.health import evaluate
from gpus.models import Alert, Gpu, Health, NodeProbe, SimulatedFault, WebhookDelivery
from gpus.probe import THROTTLE_POWER, THROTTLE_THERMAL, NvmlProbe, SimulatedProbe
from tests.gpus.fake_nvml import FakeNvml

HEALTHY = {"temperature": 60, "power_draw": 300.0, "xids": [], "throttle_reasons": 0, "pcie_replay": 100}


def rules(reading: dict, history: list[dict] | None = None) -> dict[str, str]:
    return {f.rule: f.severity for f in evaluate({**HEALTHY, **reading}, history or [], 85)}


def test_healthy() -> None:
    assert rules({}) == {}


@pytest.mark.parametrize("xid", [79, 48, 95, 46, 62, 64, 74])
def test_critical_xids(xid: int) -> None:
    assert rules({"xids": [xid]}) == {f"xid_{xid}": Health.CRITICAL}


def test_other_xid_is_a_warning() -> None:
    assert rules({"xids": [13]}) == {"xid_13": Health.WARNING}


@pytest.mark.parametrize(
    ("reading", "rule"),
    [
        ({"ecc_dbe_volatile": 1}, "ecc_dbe"),
        ({"remap_failure": True}, "row_remap_failure"),
        ({"retired_pages_sbe": 60, "retired_pages_dbe": 3}, "retired_pages"),
        ({"lost": True}, "gpu_lost"),
    ],
)
def test_critical_conditions(reading: dict, rule: str) -> None:
    assert rules(reading)[rule] == Health.CRITICAL


def test_62_retired_pages_is_not_critical() -> None:
    assert "retired_pages" not in rules({"retired_pages_sbe": 62})


def test_throttling_within_the_last_minute() -> None:
    history = [{"throttle_reasons": THROTTLE_THERMAL, "pcie_replay": 100}, {"throttle_reasons": 0, "pcie_replay": 100}]
    assert rules({}, history) == {"thermal_throttle": Health.WARNING}
    assert rules({"throttle_reasons": THROTTLE_POWER}) == {"power_throttle": Health.WARNING}


def test_pcie_replays_per_minute() -> None:
    calm = [{"pcie_replay": 100}, {"pcie_replay": 104}]
    assert "pcie_replay" not in rules({"pcie_replay": 108}, calm)
    assert rules({"pcie_replay": 109}, calm) == {"pcie_replay": Health.WARNING}


@pytest.mark.parametrize(
    ("reading", "rule"),
    [({"temperature": 86}, "temperature"), ({"power_draw": None}, "power_unavailable"),
     ({"retired_pages_pending": True}, "pending_retirement"), ({"remap_pending": True}, "pending_retirement")],
)  # fmt: skip
def test_warnings(reading: dict, rule: str) -> None:
    assert rules(reading) == {rule: Health.WARNING}


@pytest.mark.django_db
def test_alert_lifecycle_open_dedupe_resolve(settings: Any) -> None:
    faults: list[dict] = []
    probe = SimulatedProbe(count=2, faults=lambda: faults)
    collect(probe, node="box1")
    assert set(Gpu.objects.values_list("health", flat=True)) == {Health.OK}
    faults.append({"gpu": 1, "kind": "overheat", "value": 95})
    collect(probe, node="box1")
    collect(probe, node="box1")
    alerts = Alert.objects.filter(rule="temperature")
    assert alerts.count() == 1 and alerts.get().occurrences == 2  # deduplicated
    gpu = Gpu.objects.get(index=1)
    assert gpu.health == Health.WARNING and gpu.accepts_new_replicas  # only critical GPUs are refused
    faults.clear()
    collect(probe, node="box1")  # cooled down, but thermal throttling was seen in the last minute
    assert Alert.objects.get(rule="thermal_throttle").is_open
    assert not Alert.objects.get(rule="temperature").is_open  # level alert resolved on its own


@pytest.mark.django_db
def test_latched_xid_stays_until_acknowledged(admin_user: Any) -> None:
    from gpus.alerts import acknowledge

    faults = [{"gpu": 0, "kind": "xid", "value": 79}]
    probe = SimulatedProbe(count=1, faults=lambda: faults)
    collect(probe, node="box1")
    faults.clear()
    collect(probe, node="box1")
    gpu = Gpu.objects.get()
    assert gpu.health == Health.CRITICAL and not gpu.accepts_new_replicas
    alert = Alert.objects.get(rule="xid_79")
    assert alert.is_open
    acknowledge(alert, admin_user)
    gpu.refresh_from_db()
    assert gpu.health == Health.OK and not Alert.objects.get(pk=alert.pk).is_open


@pytest.mark.django_db
def test_nvml_unavailable_is_recorded_plainly() -> None:
    result = collect(NvmlProbe(FakeNvml(init_error=pynvml_library_not_found())), node="cpu-box")
    assert result["ok"] is False
    probe = NodeProbe.objects.get(node="cpu-box")
    assert not probe.ok and "NVML could not start" in probe.error


def pynvml_library_not_found() -> int:
    import pynvml

    return pynvml.NVML_ERROR_LIBRARY_NOT_FOUND


@pytest.mark.django_db
def test_gpu_missing_from_sample_becomes_unknown() -> None:
    collect(NvmlProbe(FakeNvml(gpus=2)), node="box")
    collect(NvmlProbe(FakeNvml(gpus=1)), node="box")
    assert Gpu.objects.get(index=1).health == Health.UNKNOWN


@pytest.mark.django_db
def test_gpu_fault_command_on_simulated_source(settings: Any) -> None:
    settings.GPU_SOURCE = "simulated"
    settings.GPU_SIMULATED_COUNT = 2
    reset_probe()
    try:
        call_command("gpu_fault", "ecc_dbe", "--gpu", "1", stdout=io.StringIO())
        collect()
        assert Alert.objects.get().rule == "ecc_dbe"
        assert not SimulatedFault.objects.exists()  # applied once
    finally:
        reset_probe()


@pytest.mark.django_db
def test_gpu_fault_command_refuses_real_source(settings: Any) -> None:
    from django.core.management import CommandError

    settings.GPU_SOURCE = "nvml"
    with pytest.raises(CommandError, match="simulated"):
        call_command("gpu_fault", "xid")


@pytest.mark.django_db
def test_no_webhook_no_delivery() -> None:
    collect(SimulatedProbe(count=1, faults=lambda: [{"gpu": 0, "kind": "xid"}]), node="b")
    assert not WebhookDelivery.objects.exists()
