from django import forms
from django.utils.translation import gettext_lazy as _

from gpus.models import Webhook


class WebhookForm(forms.ModelForm):
    url = forms.URLField(label=_("Address (URL)"), max_length=500, assume_scheme="https")

    class Meta:
        model = Webhook
        fields = ["name", "url"]
