"""What a deployment would take against what its box has free: the deploy form's memory panel.

GPU engines: vLLM takes ``fraction × total`` of each GPU of a replica and refuses to start when that
much is not free, so each chosen (or each healthy, when none is chosen) GPU is compared on its own;
the model's need (weights and 16 full-length sequences, ``models_catalog.memory.estimate``) is
compared with what a replica's GPUs together reserve. The CPU engine takes the fraction of the host's
memory for its KV cache, beside the weights and its own (placement's arithmetic, ``cpu_memory``);
only this box's memory can be read from here. The verdict is placement's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.utils.translation import gettext as _

from models_catalog.memory import estimate
from models_catalog.models import LocalModel
from provisioning.models import Deployment, EngineRuntime
from provisioning.placement import PlacementRefused, cpu_memory, memory_need, place_gpus

SEQUENCES = 16  # concurrent full-length sequences the estimate plans for, as the form's default fraction does


@dataclass
class Room:
    label: str
    total: int
    free: int
    reserve: int  # what the engine would take of it

    @property
    def fits(self) -> bool:
        return self.reserve <= self.free

    @property
    def reserve_percent(self) -> int:
        return min(100, round(100 * self.reserve / self.total)) if self.total else 0

    @property
    def used_percent(self) -> int:
        return min(100, round(100 * (self.total - self.free) / self.total)) if self.total else 0


@dataclass
class Capacity:
    need: int | None = None  # bytes one replica needs (estimate), None when it cannot be estimated
    reserve: int = 0  # bytes one replica would reserve
    rooms: list[Room] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def enough(self) -> bool:
        return not self.problems


def _need(model: LocalModel, context: int) -> tuple[int | None, str | None]:
    try:
        return estimate(model.facts(), context, SEQUENCES)["total_bytes"], None
    except ValueError as exc:
        return None, str(exc)


def check(
    model: LocalModel, runtime: EngineRuntime, fraction: float, context: int | None, tensor_parallel: int = 1,
    gpu_ids: list[int] | None = None,
) -> Capacity:  # fmt: skip
    """The memory panel for one replica of ``model`` on ``runtime``'s box. Its verdict is placement's
    own (``provisioning.placement``), so the panel never says "fits" of what Deploy would refuse."""
    context = context or model.facts().get("context_length") or 4096
    need, why = _need(model, context)
    result = Capacity(need=need)
    if why:
        result.notes.append(_("No estimate: %(reason)s") % {"reason": why})
    draft = Deployment(model=model, runtime=runtime, node=runtime.node, gpu_memory_fraction=fraction,
                       max_model_len=context, tensor_parallel=tensor_parallel, gpu_ids=gpu_ids or [])  # fmt: skip
    try:
        placement_need = memory_need(draft)
    except PlacementRefused as exc:
        result.problems.append(str(exc))
        return result
    if runtime.is_cpu:
        return _cpu(result, draft, placement_need)
    return _gpu(result, draft, placement_need)


def _cpu(result: Capacity, draft: Deployment, need: int) -> Capacity:
    node = draft.node
    if node != settings.NODE_NAME:
        result.notes.append(_("The memory of %(node)s cannot be read from this box.") % {"node": node})
        return result
    wanted, available, total = cpu_memory(draft, need)
    result.reserve = wanted
    result.rooms.append(Room(_("Memory of %(node)s") % {"node": node}, total, max(available, 0), wanted))
    if wanted > available:
        result.problems.append(_("The KV cache (the fraction of memory) and the weights need more than is free."))
    return result


def _gpu(result: Capacity, draft: Deployment, need: int) -> Capacity:
    from gpus.models import Gpu

    runtime, fraction, tp, gpu_ids = draft.runtime, draft.gpu_memory_fraction, draft.tensor_parallel, draft.gpu_ids
    gpus = [g for g in Gpu.objects.filter(node=runtime.node) if g.latest.get("mem_total")]
    chosen = [g for g in gpus if g.index in gpu_ids] if gpu_ids else [g for g in gpus if g.accepts_new_replicas]
    for gpu in chosen:
        total = gpu.latest["mem_total"]
        free = total - (gpu.latest.get("mem_used") or 0)
        label = _("GPU %(index)s") % {"index": gpu.index} + f" · {gpu.name}"
        result.rooms.append(Room(label, total, free, int(fraction * total)))
    if not chosen:
        result.problems.append(_("%(node)s reports no healthy GPU with a memory reading.") % {"node": runtime.node})
        return result
    result.reserve = sum(sorted((room.reserve for room in result.rooms), reverse=True)[:tp])
    fitting = [room for room in result.rooms if room.fits]
    if len(fitting) < tp:
        result.problems.append(_("Fewer GPUs have this fraction free (%(fitting)s) than a replica needs (%(tp)s).")
                               % {"fitting": len(fitting), "tp": tp})  # fmt: skip
    if result.need is not None and result.need > result.reserve:
        text = _("The model needs about %(need)s GiB; this fraction of %(tp)s GPU(s) holds %(have)s GiB.")
        need, have = round(result.need / 2**30, 1), round(result.reserve / 2**30, 1)
        result.problems.append(text % {"need": need, "tp": tp, "have": have})
    if not result.problems:  # what the bars do not show: claimed fractions, health of ticked GPUs
        try:
            place_gpus(draft, need)
        except PlacementRefused as exc:
            result.problems.append(str(exc))
    return result


def from_query(data: Any) -> tuple[Capacity | None, str | None]:
    """The panel for the deploy form's current values (``request.GET``), or why there is none yet."""
    try:
        model = LocalModel.objects.get(pk=int(data.get("model") or 0))
        runtime = EngineRuntime.objects.get(pk=int(data.get("runtime") or 0))
        fraction = float(data.get("gpu_memory_fraction") or 0.9)
        context = int(data.get("max_model_len") or 0) or None
        tp = max(1, int(data.get("tensor_parallel") or 1))
        raw = data.getlist("gpu_ids") if hasattr(data, "getlist") else [data.get("gpu_ids") or ""]
        ids = sorted({int(part) for value in raw for part in str(value).split(",") if part.strip().isdigit()})
    except (LocalModel.DoesNotExist, EngineRuntime.DoesNotExist, ValueError):
        return None, _("Choose a model and an engine to see the memory it needs.")
    if not 0 < fraction <= 1:
        return None, _("The memory fraction is between 0.01 and 1.")
    return check(model, runtime, fraction, context, tp, ids), None
