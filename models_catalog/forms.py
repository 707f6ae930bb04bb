"""Forms of the Models pages; they validate and leave the work to the models and jobs."""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.utils.translation import gettext_lazy as _

from models_catalog.importer import ImportRefused, scan
from models_catalog.layout import UnsafePath, check_repo_id
from models_catalog.models import HubEndpoint

PATTERN = re.compile(r"^[\w*?.\[\]/-]{1,200}$")


def parse_patterns(value: str) -> list[str]:
    items = [p.strip() for p in re.split(r"[,\n]", value or "") if p.strip()]
    bad = [p for p in items if not PATTERN.match(p) or ".." in p]
    if bad:
        raise forms.ValidationError(_("Not a file pattern: %(bad)s") % {"bad": ", ".join(bad)})
    return items


class RepoIdField(forms.CharField):
    def clean(self, value: Any) -> str:
        value = super().clean(value)
        try:
            return check_repo_id(value)
        except UnsafePath:
            raise forms.ValidationError(
                _("Use the form organisation/name, with letters, digits, '.', '-' and '_'.")
            ) from None


class DownloadForm(forms.Form):
    repo_id = RepoIdField(label=_("Repository"), max_length=200, help_text=_("For example Qwen/Qwen2.5-7B-Instruct"))
    revision = forms.RegexField(label=_("Branch"), max_length=200, initial="main", regex=r"^[\w.\-/]+$", required=True)
    endpoint = forms.ModelChoiceField(
        label=_("Source"),
        queryset=HubEndpoint.objects.all(),
        required=False,
        empty_label=_("The default hub (HF_ENDPOINT setting)"),
    )
    allow_patterns = forms.CharField(
        label=_("Only these files"),
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text=_("Glob patterns, one per line. Empty: safetensors weights, configs and tokenizer files."),
    )
    ignore_patterns = forms.CharField(
        label=_("Skip these files"), required=False, widget=forms.Textarea(attrs={"rows": 2})
    )

    def clean_allow_patterns(self) -> list[str]:
        return parse_patterns(self.cleaned_data["allow_patterns"])

    def clean_ignore_patterns(self) -> list[str]:
        return parse_patterns(self.cleaned_data["ignore_patterns"])


class ImportForm(forms.Form):
    directory = forms.CharField(
        label=_("Directory on this appliance"),
        max_length=1000,
        help_text=_("An absolute path, e.g. a USB disk or a NAS mount: /mnt/usb/llama-3-8b"),
    )
    repo_id = RepoIdField(label=_("Name here"), max_length=200, help_text=_("For example acme/llama-3-8b"))
    replace = forms.BooleanField(
        label=_("Replace the files of a model of this name"), required=False,
        help_text=_("Only for a model that exists already and no deployment uses."),
    )  # fmt: skip

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Ids of its own: the Add page shows it beside the download form, which has a repo_id too.
        kwargs.setdefault("auto_id", "id_import_%s")
        super().__init__(*args, **kwargs)

    def clean_directory(self) -> str:
        from pathlib import Path

        directory = self.cleaned_data["directory"]
        try:
            scan(Path(directory))
        except (ImportRefused, OSError) as exc:
            raise forms.ValidationError(str(exc)) from None
        return directory


class EstimateForm(forms.Form):
    context_length = forms.IntegerField(label=_("Context length (tokens)"), min_value=1, max_value=10_000_000)
    concurrency = forms.IntegerField(label=_("Concurrent sequences"), min_value=1, max_value=100_000)


class EndpointForm(forms.ModelForm):
    url = forms.URLField(label=_("address"), max_length=300, assume_scheme="https")
    token = forms.CharField(
        label=_("Access token"),
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text=_("Stored encrypted and never shown again. Leave empty to keep the current one."),
    )

    class Meta:
        model = HubEndpoint
        fields = ["name", "url", "kind"]

    def save(self, commit: bool = True) -> HubEndpoint:
        endpoint = super().save(commit=False)
        if self.cleaned_data.get("token"):
            endpoint.set_token(self.cleaned_data["token"])
        if commit:
            endpoint.save()
        return endpoint
