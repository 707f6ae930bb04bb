"""Command building, the argument allowlist and placement."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest
from django.conf import settings

from gpus.collect import collect
from gpus.models import Gpu
from gpus.probe import SimulatedProbe
from provisioning import launcher
from provisioning.engines import ArgumentRefused, engine_for
from provisioning.models import Deployment, EngineRuntime, Replica
from provisioning.placement import PlacementRefused, place
from tests.workers import wait_for


def test_command_is_an_argument_list_bound_to_loopback() -> None:
    command = engine_for().command("/e/bin/python", "/m/current", "chat", 8123, gpu_memory_fraction=0.5,
                            tensor_parallel=2, max_model_len=4096, extra_args=["--max-num-seqs", "8"])  # fmt: skip
    assert command[:3] == ["/e/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "8123"
    assert command[-2:] == ["--max-num-seqs", "8"] and "--tensor-parallel-size" in command
    assert not any("key" in part.lower() for part in command)
    assert "--disable-access-log-for-endpoints" not in command  # an engine of unknown version: nothing it may lack


@pytest.mark.parametrize(("version", "filtered"), [("0.32.0", True), ("0.11.0+cpu", True), ("0.10.2", False),
                                                    ("", False), ("fake", False)])  # fmt: skip
def test_the_consoles_own_polls_stay_out_of_the_engine_log_where_it_can(version: str, filtered: bool) -> None:
    command = engine_for().command("/p", "/m", "chat", 1, gpu_memory_fraction=0.5, version=version)
    assert ("--disable-access-log-for-endpoints" in command) is filtered
    if filtered:
        assert command[command.index("--disable-access-log-for-endpoints") + 1] == "/metrics,/health"


def test_key_goes_by_environment_and_console_secrets_do_not(monkeypatch: Any) -> None:
    monkeypatch.setenv("SECRET_KEY", "console-secret")
    monkeypatch.setenv("DATABASE_URL", "postgres://x")
    env = engine_for().environment("box:7", "replica-key", [2, 3], cpu=False)
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
        engine_for().check_args(args)


def test_allowed_arguments_pass() -> None:
    args = ["--max-num-seqs", "64", "--enable-prefix-caching", "--dtype=bfloat16"]
    assert engine_for().check_args(args) == ["--max-num-seqs", "64", "--enable-prefix-caching", "--dtype", "bfloat16"]
    assert engine_for().check_args(["--trust-remote-code"], trust_remote_code_allowed=True) == ["--trust-remote-code"]


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
    marker = launcher.marker_value(settings.NODE_NAME, 999_999)
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
        assert not launcher.alive(process.pid, launcher.marker_value(settings.NODE_NAME, 1))
        assert time.monotonic() - started < 0.1
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize(
    ("fields", "field", "text"),
    [({"gpu_ids": "99"}, "gpu_ids", "gpubox has no GPU 99; its GPUs are 0, 1, 2, 3, 4, 5, 6, 7."),
     ({"gpu_ids": "3,99", "tensor_parallel": 2}, "gpu_ids", "has no GPU 99"),
     ({"tensor_parallel": 16}, "tensor_parallel", "gpubox has 8 GPUs; this needs 16."),
     ({"tensor_parallel": 4, "replicas": 3}, "tensor_parallel", "this needs 12.")],
)  # fmt: skip
def test_the_deploy_form_knows_the_boxs_gpus(
    tiny_model: Any, gpu_runtime: EngineRuntime, fields: dict, field: str, text: str
) -> None:
    from provisioning.forms import DeployForm

    collect(SimulatedProbe(8), "gpubox")
    data = {"model": tiny_model.pk, "name": "big", "runtime": gpu_runtime.pk, "replicas": 1, "tensor_parallel": 1,
            "gpu_memory_fraction": 0.5} | fields  # fmt: skip
    form = DeployForm(data)
    assert not form.is_valid() and text in " ".join(form.errors[field]), form.errors
    assert DeployForm(data | {"gpu_ids": "7", "tensor_parallel": 1, "replicas": 1}).is_valid()


def test_the_cpu_engine_takes_no_gpus(tiny_model: Any, fake_runtime: EngineRuntime) -> None:
    from provisioning.forms import DeployForm

    data = {"model": tiny_model.pk, "name": "cpu", "runtime": fake_runtime.pk, "replicas": 1, "tensor_parallel": 1,
            "gpu_memory_fraction": 0.1, "gpu_ids": "0"}  # fmt: skip
    form = DeployForm(data)
    assert not form.is_valid() and "uses no GPU" in form.errors["gpu_ids"][0]


LEADER = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
out = sys.argv[1]
def record(text):
    open(out, "a").write(text + "\\\\n"); sys.exit(0)
signal.signal(signal.SIGTERM, lambda *a: record("child got SIGTERM"))
signal.signal(signal.SIGUSR1, lambda *a: record("child stopped by the leader"))
while True: time.sleep(0.05)
''', sys.argv[1]])
def shut_down(*args):
    if sys.argv[2] == "tidy":
        child.send_signal(signal.SIGUSR1); child.wait()
    sys.exit(0)
signal.signal(signal.SIGTERM, shut_down)
open(sys.argv[1], "a").write("started\\n")
while True: time.sleep(0.05)
"""


@pytest.mark.parametrize("leader", ["tidy", "careless"])
def test_stop_lets_the_engines_main_process_stop_its_workers_and_kills_what_it_leaves(
    tmp_path: Any, leader: str
) -> None:
    """vLLM's server stops its engine-core and worker processes itself; a SIGTERM to the whole group
    at once killed the core under it (EngineDeadError trace in every stopped engine's log)."""
    script, out = tmp_path / "leader.py", tmp_path / "out.txt"
    script.write_text(LEADER)
    pid = launcher.start([sys.executable, str(script), str(out), leader], {"PATH": os.defpath}, tmp_path / "log")
    assert wait_for(lambda: out.exists() and "started" in out.read_text(), timeout=10)
    time.sleep(0.3)  # the child has set its handlers
    launcher.stop(pid, grace=2)
    lines = out.read_text().split()
    assert "SIGTERM" not in " ".join(lines)  # the child never got the group's SIGTERM
    if leader == "tidy":
        assert out.read_text().splitlines() == ["started", "child stopped by the leader"]
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of the group is left, a child its leader forgot included


def _wheel(folder: Any, name: str, version: str) -> None:
    """A minimal pure-Python wheel of ``name`` (a module ``name`` holding VALUE = 42)."""
    import zipfile

    module, info = name.replace("-", "_"), f"{name.replace('-', '_')}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / f"{module}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def test_an_engine_installs_from_an_offline_bundles_packages_and_asks_no_registry(settings: Any, tmp_path: Any) -> None:
    """An offline bundle leaves each engine's packages in ENGINE_WHEELS_DIR/<package>/: the install
    takes them from there with --no-index, so a version that is not there fails instead of being
    fetched."""
    from provisioning.runtimes import install_files

    settings.ENGINE_WHEELS_DIR = tmp_path / "wheels"
    _wheel(tmp_path / "wheels" / "offline-engine", "offline-engine", "1.0")
    python, log = tmp_path / "env" / "bin" / "python", []
    install_files(python, "offline-engine", "1.0", log.append)
    assert any("installing from" in line and "offline-engine" in line for line in log)
    found = subprocess.run([str(python), "-c", "import offline_engine; print(offline_engine.VALUE)"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert found.stdout.strip() == "42"
    with pytest.raises(RuntimeError):
        install_files(python, "offline-engine", "2.0", log.append)  # not in the folder: never the registry
    assert any("--no-index" in line for line in log)
