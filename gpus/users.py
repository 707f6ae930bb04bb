"""What uses the GPUs, as the apps that run things on them say (the GPU code knows nothing of
deployments, DESIGN.md): each registers ``provider(node or None) -> [GpuUser]`` at start-up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Provider = Callable[[str | None], list["GpuUser"]]
_providers: list[Provider] = []


@dataclass(frozen=True)
class GpuUser:
    node: str
    pid: int | None  # its process (group leader): how the driver's process list is matched to it
    label: str  # what the pages call it
    url: str = ""  # its page
    state: str = ""  # in words
    gpus: list[int] = field(default_factory=list)  # the GPUs it was placed on (empty: none, e.g. CPU)
    slot: int = 0  # a stable small number, for the SIMULATED source to spread GPU-less users over its GPUs
    memory_fraction: float = 0.0  # of a GPU's memory it takes (the SIMULATED source shows that much used)
    running: bool = True  # started or serving (not stopping)


def register(provider: Provider) -> None:
    _providers.append(provider)


def users(node: str | None = None) -> list[GpuUser]:
    """Everything that runs on ``node`` (every node: None) and may hold GPUs."""
    return [user for provider in _providers for user in provider(node)]
