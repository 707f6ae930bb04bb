"""Forms of the project-wide pages: users, API tokens, audit filters."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import AuthenticationForm
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from appliance.models import AuditEvent
from appliance.roles import Role


class UserCreateForm(forms.Form):
    username = forms.RegexField(
        label=_("User name"),
        max_length=150,
        regex=r"^[\w.@+-]+$",
        error_messages={"invalid": _("Use letters, digits and @ . + - _ only.")},
    )
    email = forms.EmailField(label=_("Email"), required=False)
    role = forms.ChoiceField(label=_("Role"), choices=Role.choices, initial=Role.VIEWER)

    def clean_username(self) -> str:
        username = self.cleaned_data["username"]
        if get_user_model().objects.filter(username__iexact=username).exists():
            raise forms.ValidationError(_("A user with this name already exists."))
        return username


class RoleForm(forms.Form):
    role = forms.ChoiceField(label=_("Role"), choices=Role.choices)


class TokenCreateForm(forms.Form):
    name = forms.CharField(label=_("Name"), max_length=100, help_text=_("What the token is for, e.g. “backup script”."))
    expires_in_days = forms.IntegerField(
        label=_("Expires after (days)"),
        min_value=1,
        max_value=3650,
        required=False,
        help_text=_("Leave empty for a token that does not expire."),
    )

    def expires_at(self) -> Any:
        days = self.cleaned_data.get("expires_in_days")
        return timezone.now() + timedelta(days=days) if days else None


class AuditFilterForm(forms.Form):
    actor = forms.CharField(label=_("Who"), required=False, max_length=150)
    action = forms.CharField(label=_("Action"), required=False, max_length=100)
    target = forms.CharField(label=_("Target"), required=False, max_length=100)
    outcome = forms.ChoiceField(
        label=_("Outcome"), required=False, choices=[("", _("Any")), *AuditEvent.Outcome.choices]
    )
    since = forms.DateField(label=_("From"), required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(label=_("Until"), required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("since") and data.get("until") and data["since"] > data["until"]:
            self.add_error("until", _("“Until” must not be before “From”."))
        return data

    def apply(self, events: Any) -> Any:
        """Filter a queryset of audit events by the valid fields of this form."""
        data = self.cleaned_data if self.is_valid() else {}
        if data.get("actor"):
            events = events.filter(actor_name__icontains=data["actor"])
        if data.get("action"):
            events = events.filter(action__icontains=data["action"])
        if data.get("target"):
            events = events.filter(Q(target_repr__icontains=data["target"]) | Q(target_type__icontains=data["target"]))
        if data.get("outcome"):
            events = events.filter(outcome=data["outcome"])
        if data.get("since"):
            events = events.filter(created_at__date__gte=data["since"])
        if data.get("until"):
            events = events.filter(created_at__date__lte=data["until"])
        return events


class LoginForm(AuthenticationForm):
    """Django's sign-in form, saying so when the directory (not the password) was the problem."""

    def clean(self) -> dict[str, Any]:
        from appliance.directory import DIRECTORY_ERROR

        try:
            return super().clean()
        except forms.ValidationError:
            message = getattr(self.request, DIRECTORY_ERROR, None)
            if message:
                raise forms.ValidationError(message, code="directory") from None
            raise
