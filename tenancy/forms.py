from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.contrib.auth import get_user_model
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from tenancy.models import ApiKey, Department, Membership


class DepartmentForm(forms.ModelForm):
    class Meta:
        model = Department
        fields = ["name", "contact", "priority", "rpm", "tpm", "tokens_per_day", "tokens_per_month",
                  "max_concurrency", "max_tokens_per_request", "deployments"]  # fmt: skip
        widgets = {"deployments": forms.CheckboxSelectMultiple}
        help_texts = {"rpm": _("Empty: unlimited.")}


class MemberForm(forms.Form):
    username = forms.CharField(label=_("User name"), max_length=150)
    role = forms.ChoiceField(label=_("Role"), choices=Membership.Role.choices)

    def clean_username(self) -> Any:
        user = get_user_model().objects.filter(username=self.cleaned_data["username"], is_active=True).first()
        if user is None:
            raise forms.ValidationError(_("No active user with this name."))
        return user


class KeyForm(forms.ModelForm):
    expires_in_days = forms.IntegerField(label=_("Expires after (days)"), min_value=1, max_value=3650, required=False)

    class Meta:
        model = ApiKey
        fields = ["name", "rpm", "tpm", "max_concurrency", "max_tokens_per_request"]
        help_texts = {"rpm": _("Optional: can only narrow the department's limits.")}

    def expires_at(self) -> Any:
        days = self.cleaned_data.get("expires_in_days")
        return timezone.now() + timedelta(days=days) if days else None


class RotateForm(forms.Form):
    grace_minutes = forms.IntegerField(label=_("Old key keeps working for (minutes)"), min_value=0, max_value=10080,
                                       initial=60)  # fmt: skip
