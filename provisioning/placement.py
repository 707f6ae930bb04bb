"""Choosing where a replica runs: GPUs with room for the model's estimate on healthy GPUs, or, on
a box without GPUs (the CPU runtime), enough system memory. Refusals name what did not fit."""

from __future__ import annotations

from pathlib import Path

from gpus.models import Gpu
from models_catalog.memory import estimate
from provisioning.models import Deployment, Replica

GiB = 1024**3
# Resident memory of a vLLM CPU engine besides weights and KV cache (ENGINE_NOTES.md: about 2 GB).
CPU_ENGINE_OVERHEAD = 2 * GiB


class PlacementRefused(Exception):
    """The replica does not fit; the message says what is missing."""


def memory_need(deployment: Deployment) -> int:
    """Bytes the model needs: weights plus the KV cache of one full-length sequence."""
    facts = deployment.model.facts()
    context = deployment.max_model_len or facts.get("context_length") or 4096
    try:
        return estimate(facts, context, 1)["total_bytes"]
    except ValueError as exc:
        raise PlacementRefused(f"Cannot size {deployment.model}: {exc}") from None


def meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * 1024
    return values


def place_cpu(deployment: Deployment, need: int) -> list[int]:
    info = meminfo()
    kv_space = int(deployment.gpu_memory_fraction * info["MemTotal"])
    # Replicas still starting have not taken their memory yet: count them as taken.
    starting = Replica.objects.filter(node=deployment.node, state__in=[Replica.State.STARTING, Replica.State.PLACING])
    reserved = sum(
        int(r.deployment.gpu_memory_fraction * info["MemTotal"]) + CPU_ENGINE_OVERHEAD
        for r in starting.select_related("deployment")
    )
    wanted = need + kv_space + CPU_ENGINE_OVERHEAD
    available = info["MemAvailable"] - reserved
    if wanted > available:
        raise PlacementRefused(
            f"Not enough memory on {deployment.node}: the model and its KV cache need about {wanted / GiB:.1f} GiB "
            f"(memory fraction {deployment.gpu_memory_fraction:g}), {max(available, 0) / GiB:.1f} GiB are available."
        )
    return []


def claimed_fractions(node: str) -> dict[int, float]:
    """Memory fraction of each GPU already promised to running replicas."""
    claimed: dict[int, float] = {}
    active = Replica.objects.filter(node=node).exclude(state__in=list(Replica.TERMINAL)).select_related("deployment")
    for replica in active:
        for gpu in replica.gpu_ids:
            claimed[gpu] = claimed.get(gpu, 0.0) + replica.deployment.gpu_memory_fraction
    return claimed


def place_gpus(deployment: Deployment, need: int, exclude_replica: int | None = None) -> list[int]:
    gpus = {gpu.index: gpu for gpu in Gpu.objects.filter(node=deployment.node)}
    count = deployment.tensor_parallel
    if count > len(gpus):
        raise PlacementRefused(f"The deployment needs {count} GPUs; {deployment.node} has {len(gpus)}.")
    if deployment.gpu_ids:
        unknown = [i for i in deployment.gpu_ids if i not in gpus]
        if unknown:
            raise PlacementRefused(f"{deployment.node} has no GPU {', '.join(map(str, unknown))}.")
        candidates = [gpus[i] for i in deployment.gpu_ids]
    else:
        candidates = list(gpus.values())
    claimed = claimed_fractions(deployment.node)
    per_gpu = need / count
    fitting, reasons = [], []
    for gpu in candidates:
        total = gpu.latest.get("mem_total") or 0
        used = gpu.latest.get("mem_used") or 0
        if not gpu.accepts_new_replicas:
            reasons.append(f"GPU {gpu.index} is {gpu.get_health_display().lower()}")
        elif claimed.get(gpu.index, 0.0) + deployment.gpu_memory_fraction > 1.0 + 1e-9:
            reasons.append(f"GPU {gpu.index} has {1 - claimed.get(gpu.index, 0.0):.2f} of its memory unclaimed")
        elif per_gpu > deployment.gpu_memory_fraction * total:
            reasons.append(
                f"GPU {gpu.index}: a fraction of {deployment.gpu_memory_fraction:g} is "
                f"{deployment.gpu_memory_fraction * total / GiB:.1f} GiB, the model needs {per_gpu / GiB:.1f} GiB"
            )
        elif deployment.gpu_memory_fraction * total > total - used:
            reasons.append(
                f"GPU {gpu.index} has {(total - used) / GiB:.1f} GiB free, the memory fraction asks for "
                f"{deployment.gpu_memory_fraction * total / GiB:.1f} GiB"
            )
        else:
            fitting.append(gpu)
    if len(fitting) < count:
        raise PlacementRefused(f"Needs {count} GPU(s) with {per_gpu / GiB:.1f} GiB each: " + "; ".join(reasons))
    fitting.sort(key=lambda g: (claimed.get(g.index, 0.0), g.latest.get("mem_used") or 0))
    return sorted(g.index for g in fitting[:count])


def place(deployment: Deployment) -> list[int]:
    """GPU indexes for one more replica of ``deployment`` (empty on the CPU runtime)."""
    need = memory_need(deployment)
    if deployment.runtime.is_cpu:
        return place_cpu(deployment, need)
    return place_gpus(deployment, need)
