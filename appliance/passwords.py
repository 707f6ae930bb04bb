"""Changing one's own password: the page every user reaches from the user menu, and where the first
admin is held (appliance/middleware.py) until the password printed by ``ensure_admin`` is replaced."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth import forms as auth_forms
from django.contrib.auth import views as auth_views
from django.http import HttpResponse
from django.urls import reverse_lazy
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from appliance import audit
from appliance.models import Profile


class PasswordChangeForm(auth_forms.PasswordChangeForm):
    """Django's form (old password, the password validators), refusing the current password again."""

    error_messages = {
        **auth_forms.PasswordChangeForm.error_messages,
        "password_unchanged": _("The new password must differ from the current one."),
    }

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        old, new = cleaned.get("old_password"), cleaned.get("new_password1")
        if old and new and old == new:
            self.add_error("new_password1", self.error_messages["password_unchanged"])
        return cleaned


class PasswordChangeView(auth_views.PasswordChangeView):
    form_class = PasswordChangeForm
    template_name = "registration/password_change_form.html"
    success_url = reverse_lazy("dashboard:overview")

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        required = Profile.password_change_required(self.request.user)
        return super().get_context_data(**kwargs, required=required, nav="settings")

    def form_valid(self, form: PasswordChangeForm) -> HttpResponse:
        response = super().form_valid(form)  # keeps this session signed in (update_session_auth_hash)
        Profile.objects.filter(user=self.request.user).update(must_change_password=False)
        audit.record(self.request, "user.change_password", self.request.user)
        messages.success(self.request, gettext("Your password was changed."))
        return response
