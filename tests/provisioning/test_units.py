"""Command building, the argument allowlist and placement."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

from gpus.collect import collect
from gpus.models import Gpu
from gpus.probe import SimulatedProbe
from provisioning import launcher
from provisioning.launcher import ArgumentRefused, build_command, build_environment, check_extra_args
from provisioning.models import Deployment, EngineRuntime, Replica
from provisioning.placement import PlacementRefused, place


def test_command_is_an_argument_list_bound_to_loopback() -> None:
    command = build_command("/e/bin/python", "/m/current", "chat", 8123, gpu_memory_fraction=0.5,
                            tensor_parallel=2, max_model_len=4096, extra_args=["--max-num-seqs", "8"])  # fmt: skip
    assert command[:3] == ["/e/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "8123"
    assert command[-2:] == ["--max-num-seqs", "8"] and "--tensor-parallel-size" in command
    assert not any("key" in part.lower() for part in command)


def test_key_goes_by_environment_and_console_secrets_do_not(monkeypatch: Any) -> None:
    monkeypatch.setenv("SECRET_KEY", "console-secret")
    monkeypatch.setenv("DATABASE_URL", "postgres://x")
    env = build_environment("box:7", "replica-key", [2, 3], cpu=False)
    assert env["VLLM_API_KEY"] == "replica-key" and env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "SECRET_KEY" not in env and "DATABASE_URL" not in env and env["APPLIANCE_REPLICA"] == "box:7"


@pytest.mark.parametrize(
    "args",
    [["--host", "0.0.0.0"],  # noqa: S104 - the refused argument under test ["--port", "80"], ["--api-key", "x"], ["--trust-remote-code"], ["--max-num-seqs"],
     ["--max-num-seqs", "--enforce-eager"], ["--dtype", "half;rm -rf /"], ["--enforce-eager=1"], ["--model", "/etc"],
     ["--chat-template", "/etc/passwd"]],
)  # fmt: skip
def test_arguments_outside_the_allowlist_are_refused(args: list[str]) -> None:
    with pytest.raises(ArgumentRefused):
        check_extra_args(args)


def test_allowed_arguments_pass() -> None:
    args = ["--max-num-seqs", "64", "--enable-prefix-caching", "--dtype=bfloat16"]
    assert check_extra_args(args) == ["--max-num-seqs", "64", "--enable-prefix-caching", "--dtype", "bfloat16"]
    assert check_extra_args(["--trust-remote-code"], trust_remote_code_allowed=True) == ["--trust-remote-code"]


@pytest.fixture
def gpu_runtime(db: None) -> EngineRuntime:
    return EngineRuntime.objects.create(node="gpubox", name="vllm", package="vllm", python_path="/x", status="ready")


def idle(node: str) -> None:
    """Pin the simulated GPUs' memory use (the simulated numbers wander with time)."""
    for gpu in Gpu.objects.filter(node=node):
        gpu.latest = {**gpu.latest, "mem_used": 1024**3, "mem_total": 80 * 1024**3}
        gpu.save()


def test_gpu_placement_picks_healthy_gpus_with_room(tiny_model: Any, gpu_runtime: EngineRuntime) -> None:
    collect(SimulatedProbe(count=4, faults=lambda: [{"gpu": 0, "kind": "ecc_dbe"}]), node="gpubox")
    idle("gpubox")
    deployment = Deployment(name="d", model=tiny_model, runtime=gpu_runtime, node="gpubox", tensor_parallel=2,
                            gpu_memory_fraction=0.5)  # fmt: skip
    chosen = place(deployment)
    assert len(chosen) == 2 and 0 not in chosen  # GPU 0 is critical


def test_gpu_placement_refusals_name_what_did_not_fit(tiny_model: Any, gpu_runtime: EngineRuntime) -> None:
    collect(SimulatedProbe(count=2), node="gpubox")
    idle("gpubox")
    too_many = Deployment(name="d", model=tiny_model, runtime=gpu_runtime, node="gpubox", tensor_parallel=4)
    with pytest.raises(PlacementRefused, match="needs 4 GPUs; gpubox has 2"):
        place(too_many)
    unknown = Deployment(name="d", model=tiny_model, runtime=gpu_runtime, node="gpubox", gpu_ids=[7])
    with pytest.raises(PlacementRefused, match="no GPU 7"):
        place(unknown)
    full = Deployment.objects.create(name="full", model=tiny_model, runtime=gpu_runtime, node="gpubox",
                                     gpu_ids=[0], gpu_memory_fraction=0.8)  # fmt: skip
    Replica.objects.create(deployment=full, ordinal=0, node="gpubox", gpu_ids=[0], state="ready")
    second = Deployment(name="s", model=tiny_model, runtime=gpu_runtime, node="gpubox", gpu_ids=[0],
                        gpu_memory_fraction=0.5)  # fmt: skip
    with pytest.raises(PlacementRefused, match=r"GPU 0 has 0\.20 of its memory unclaimed"):
        place(second)
    Gpu.objects.filter(index=1).update(health="critical")
    other = Deployment(name="o", model=tiny_model, runtime=gpu_runtime, node="gpubox", gpu_ids=[1])
    with pytest.raises(PlacementRefused, match="GPU 1 is critical"):
        place(other)
    Gpu.objects.filter(index=1).update(health="ok", latest={"mem_used": 60 * 1024**3, "mem_total": 80 * 1024**3})
    busy = Deployment(
        name="b", model=tiny_model, runtime=gpu_runtime, node="gpubox", gpu_ids=[1], gpu_memory_fraction=0.5
    )
    with pytest.raises(PlacementRefused, match=r"GPU 1 has 20\.0 GiB free, the memory fraction asks for 40\.0 GiB"):
        place(busy)


def test_cpu_placement_checks_system_memory(tiny_model: Any, fake_runtime: EngineRuntime) -> None:
    fits = Deployment(
        name="c", model=tiny_model, runtime=fake_runtime, node=fake_runtime.node, gpu_memory_fraction=0.05
    )
    assert place(fits) == []
    greedy = Deployment(
        name="g", model=tiny_model, runtime=fake_runtime, node=fake_runtime.node, gpu_memory_fraction=1.0
    )
    with pytest.raises(PlacementRefused, match="Not enough memory"):
        place(greedy)


def test_an_engine_started_through_a_wrapper_is_alive_while_it_execs() -> None:
    """``#!/usr/bin/env python3`` execs twice; between the halves /proc shows an empty environment.
    Watching from the first moment, the replica must never look dead (it would be restarted)."""
    marker = launcher.marker_value("testnode", 999_999)
    env = {**os.environ, launcher.MARKER: marker}
    for _ in range(6):
        process = subprocess.Popen(["/usr/bin/env", sys.executable, "-c", "import time; time.sleep(30)"], env=env,
                                   start_new_session=True)  # fmt: skip
        try:
            until = time.monotonic() + 0.2
            while time.monotonic() < until:
                assert launcher.alive(process.pid, marker)
        finally:
            process.kill()
            process.wait()
        assert not launcher.alive(process.pid, marker)  # gone: answered at once, not after the settle time


def test_a_process_that_is_not_ours_is_not_alive() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = time.monotonic()
        assert not launcher.alive(process.pid, launcher.marker_value("testnode", 1))
        assert time.monotonic() - started < 0.1
    finally:
        process.kill()
        process.wait()
