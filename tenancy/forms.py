from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from django import forms
from django.contrib.auth import get_user_model
from django.core.validators import MaxValueValidator, MinValueValidator
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from provisioning.models import Deployment
from tenancy import reports
from tenancy.models import ApiKey, Department, Membership

# Sane bounds for every quota, shared by the pages and the API. Empty means unlimited, so 0 is refused
# (the limiter reads 0 as "no limit", which is the opposite of what someone typing 0 means).
QUOTA_BOUNDS = {
    "rpm": (1, 1_000_000),
    "tpm": (1, 1_000_000_000),
    "tokens_per_day": (1, 10**12),
    "tokens_per_month": (1, 10**13),
    "max_concurrency": (1, 100_000),
    "max_tokens_per_request": (1, 10_000_000),
}
KEY_MAX_DAYS = 3650


class QuotaBounds:
    """Replaces the model fields' range (0 … the column's maximum) with ``QUOTA_BOUNDS``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, (low, high) in QUOTA_BOUNDS.items():
            field = self.fields.get(name)
            if field is None:
                continue
            kept = [v for v in field.validators if not isinstance(v, MinValueValidator | MaxValueValidator)]
            field.validators = [*kept, MinValueValidator(low), MaxValueValidator(high)]
            field.min_value, field.max_value = low, high
            field.widget.attrs.update(min=low, max=high)


class IdsField(forms.ModelMultipleChoiceField):
    """Objects chosen by id; an id past the database's integer range is refused as a bad choice
    (it would fail in the query instead)."""

    @staticmethod
    def _numbers(value: Any) -> list[int]:
        numbers = []
        for pk in value:
            try:
                numbers.append(int(str(pk)))
            except ValueError:
                continue  # reported by the parent as an invalid value
        return numbers

    def _check_values(self, value: Any) -> Any:
        for number in self._numbers(value):
            if abs(number) >= 2**63:
                raise forms.ValidationError(
                    self.error_messages["invalid_choice"], code="invalid_choice", params={"value": number}
                )
        return super()._check_values(value)


class DeploymentsField(IdsField):
    """Deployments by id. A deleted deployment kept for past bills (archived) is refused by name,
    with its own error (``code="archived"``), not as an unknown id."""

    default_error_messages = {
        "archived": _("These deployments were deleted and cannot be chosen: %(names)s."),
    }

    def _check_values(self, value: Any) -> Any:
        numbers = [n for n in self._numbers(value) if abs(n) < 2**63]
        archived = Deployment.all_objects.filter(pk__in=numbers, archived_at__isnull=False).order_by("pk")
        if numbers and archived.exists():
            names = ", ".join(f"{d.name} (id {d.pk})" for d in archived)
            raise forms.ValidationError(self.error_messages["archived"], code="archived", params={"names": names})
        return super()._check_values(value)


class DepartmentForm(QuotaBounds, forms.ModelForm):
    """A department's settings. Its name must be unused, also by a deleted department kept for past
    bills (archived): those bills show the name, and two departments of one name could not be told apart."""

    class Meta:
        model = Department
        fields = ["name", "contact", "priority", "rpm", "tpm", "tokens_per_day", "tokens_per_month",
                  "max_concurrency", "max_tokens_per_request", "deployments"]  # fmt: skip
        widgets = {"deployments": forms.CheckboxSelectMultiple}
        field_classes = {"deployments": DeploymentsField}
        help_texts = {"rpm": _("Empty: unlimited.")}

    def clean_name(self) -> str:
        name = " ".join(self.cleaned_data["name"].split())
        others = Department.objects.filter(name__iexact=name).exclude(pk=self.instance.pk)
        if others.filter(archived_at__isnull=False).exists():
            raise forms.ValidationError(
                _("A deleted department had this name; its past bills still show it. Choose another name."),
                code="archived",
            )
        same = others.first()
        if same is not None:  # "research" beside "Research" could not be told apart on a bill
            raise forms.ValidationError(
                _("The department “%(name)s” exists already (names are compared without case)."),
                code="taken", params={"name": same.name},
            )  # fmt: skip
        return name


class MemberForm(forms.Form):
    username = forms.CharField(label=_("User name"), max_length=150)
    role = forms.ChoiceField(label=_("Role"), choices=Membership.Role.choices)

    def clean_username(self) -> Any:
        user = get_user_model().objects.filter(username=self.cleaned_data["username"], is_active=True).first()
        if user is None:
            raise forms.ValidationError(_("No active user with this name."))
        return user


class KeyForm(QuotaBounds, forms.ModelForm):
    """A new key of ``department``: its limits, and either all of the department's deployments
    (``all_deployments``) or exactly those chosen (none chosen: the key can use none)."""

    expires_in_days = forms.IntegerField(
        label=_("Expires after (days)"), min_value=1, max_value=KEY_MAX_DAYS, required=False
    )
    deployments = DeploymentsField(
        label=_("Deployments"),
        queryset=Deployment.objects.none(),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text=_("Only with “all of the department's deployments” off: the key may use exactly these. "
                    "None chosen: the key can use no deployment at all."),
    )  # fmt: skip

    field_order = ["name", "all_deployments", "deployments"]

    class Meta:
        model = ApiKey
        fields = ["name", "all_deployments", "rpm", "tpm", "max_concurrency", "max_tokens_per_request"]
        help_texts = {"rpm": _("Optional: can only narrow the department's limits.")}

    def __init__(self, *args: Any, department: Department | None = None, **kwargs: Any) -> None:
        # Ids of its own: the department page shows it beside the department's form, whose fields
        # have the same names (one id twice, and a label leads to the other form's field).
        kwargs.setdefault("auto_id", "id_key_%s")
        super().__init__(*args, **kwargs)
        self.department = department
        if department is not None:
            self.fields["deployments"].queryset = department.deployments.all()

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if self.department is not None:
            for name in ("rpm", "tpm", "max_concurrency", "max_tokens_per_request"):
                own, department = data.get(name), getattr(self.department, name)
                if own is not None and department is not None and own > department:
                    self.add_error(name, forms.ValidationError(
                        _("Above the department's limit (%(limit)s): a key's limit can only narrow it."),
                        code="above_department", params={"limit": f"{department:,}"}))  # fmt: skip
        if data.get("all_deployments") and data.get("deployments"):
            self.add_error(
                "deployments",
                forms.ValidationError(
                    _("Choose deployments only with “all of the department's deployments” off."), code="both"
                ),
            )
        return data

    def expires_at(self) -> Any:
        days = self.cleaned_data.get("expires_in_days")
        return timezone.now() + timedelta(days=days) if days else None


class RotateForm(forms.Form):
    grace_minutes = forms.IntegerField(label=_("Old key keeps working for (minutes)"), min_value=0,
                                       max_value=ApiKey.ROTATION_GRACE_MAX_MINUTES,
                                       initial=ApiKey.ROTATION_GRACE_DEFAULT_MINUTES)  # fmt: skip


class DepartmentsField(IdsField):
    pass


class UsageFilterForm(forms.Form):
    """The usage page's filters. Departments are offered from ``visible_to(user)`` only, so an id of a
    department the user may not see is refused like an unknown one. Missing dates get defaults
    (the last seven days), written back into the form's data so the page shows them."""

    start = forms.DateField(label=_("From (UTC)"), required=False, widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(label=_("Until (UTC)"), required=False, widget=forms.DateInput(attrs={"type": "date"}))
    department = DepartmentsField(
        label=_("Departments"), queryset=Department.objects.none(), required=False,
        help_text=_("None selected: all you may see."),
    )  # fmt: skip
    group = forms.ChoiceField(
        label=_("Group by"),
        choices=[("department", _("Department")), ("key", _("API key")), ("model", _("Model"))],
        required=False,
    )

    def __init__(self, data: Any, user: Any, **kwargs: Any) -> None:
        data = data.copy()
        end = data.get("end") or reports.today().isoformat()
        data["end"] = end
        if not data.get("start"):
            try:
                data["start"] = (date.fromisoformat(end) - timedelta(days=reports.DEFAULT_DAYS - 1)).isoformat()
            except ValueError:
                data["start"] = ""  # the end date's own error is enough
        data["group"] = data.get("group") or "department"
        super().__init__(data, **kwargs)
        self.fields["department"].queryset = Department.objects.visible_to(user)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("end") and not data.get("start") and "start" not in self.errors:
            data["start"] = data["end"] - timedelta(days=reports.DEFAULT_DAYS - 1)  # an end in another format
        start, end = data.get("start"), data.get("end")
        for name in ("start", "end"):
            value = data.get(name)
            if value is not None and not reports.FIRST_DAY <= value <= reports.LAST_DAY:
                self.add_error(name, _("Enter a date between %(first)s and %(last)s.")
                               % {"first": reports.FIRST_DAY, "last": reports.LAST_DAY})  # fmt: skip
                return data
        if start and end:
            if end < start:
                self.add_error("end", _("“Until” must not be before “From”."))
            elif (end - start).days + 1 > reports.MAX_DAYS:
                self.add_error("end", _("A report covers at most %(days)d days.") % {"days": reports.MAX_DAYS})
        return data

    def range(self) -> reports.Range:
        """The selected days (call after ``is_valid()``)."""
        return reports.Range(self.cleaned_data["start"], self.cleaned_data["end"])

    def department_ids(self) -> list[int] | None:
        chosen = self.cleaned_data.get("department")
        return [d.pk for d in chosen] if chosen else None


class MonthForm(forms.Form):
    month = forms.CharField(
        label=_("Month"), required=False, widget=forms.TextInput(attrs={"type": "month", "placeholder": "YYYY-MM"})
    )

    def __init__(self, data: Any, **kwargs: Any) -> None:
        data = data.copy()
        data["month"] = data.get("month") or f"{reports.today():%Y-%m}"
        super().__init__(data, **kwargs)

    def clean_month(self) -> date:
        try:
            return reports.parse_month(self.cleaned_data["month"])
        except ValueError:
            raise forms.ValidationError(_("Enter a month as YYYY-MM, for example 2025-03.")) from None


def _price_field(label: str) -> forms.DecimalField:
    return forms.DecimalField(label=label, min_value=0, max_value=reports.MAX_PRICE, max_digits=12, decimal_places=4,
                              initial=0)  # fmt: skip


class ModelPriceForm(forms.Form):
    """Set the prices of one served model (creates its row or replaces its prices)."""

    model = forms.CharField(label=_("Served model name"), max_length=200,
                            widget=forms.TextInput(attrs={"list": "model-names"}))  # fmt: skip
    prompt_per_million = _price_field(_("Price per 1M prompt tokens"))
    completion_per_million = _price_field(_("Price per 1M completion tokens"))
    gpu_hour = _price_field(_("Price per GPU-hour"))

    def clean_model(self) -> str:
        """A name the bills can carry: a deployment's (a deleted one's too, for past months) or one
        that usage was recorded under."""
        from tenancy.models import UsageRollup

        name = self.cleaned_data["model"].strip()
        if Deployment.all_objects.filter(name=name).exists() or UsageRollup.objects.filter(model=name).exists():
            return name
        served = ", ".join(Deployment.objects.order_by("name").values_list("name", flat=True)[:20]) or "—"
        raise forms.ValidationError(
            _("No deployment is named “%(name)s”. Served models: %(served)s."),
            code="unknown_model", params={"name": name[:100], "served": served},
        )  # fmt: skip


class KeyApiForm(KeyForm):
    """The key form of the management API: an expiry moment instead of a number of days, and the
    deployments the key may use, which can only narrow its department's (``code="widens"``)."""

    def __init__(self, *args: Any, department: Department, **kwargs: Any) -> None:
        super().__init__(*args, department=department, **kwargs)
        # Every deployment, so that one of another department is told apart from an unknown id.
        self.fields["deployments"].queryset = Deployment.objects.all()
        del self.fields["expires_in_days"]
        # Added here, not declared on the class: the name would clash with KeyForm.expires_at().
        self.fields["expires_at"] = forms.DateTimeField(required=False)

    def clean_expires_at(self) -> Any:
        moment = self.cleaned_data.get("expires_at")
        if moment is not None and moment <= timezone.now():
            raise forms.ValidationError(_("The expiry must be in the future."), code="past")
        if moment is not None and moment > timezone.now() + timedelta(days=KEY_MAX_DAYS):
            raise forms.ValidationError(
                _("The expiry can be at most %(days)d days ahead."), code="too_far", params={"days": KEY_MAX_DAYS}
            )
        return moment

    def clean_deployments(self) -> Any:
        chosen = self.cleaned_data.get("deployments") or []
        allowed = set(self.department.deployments.values_list("pk", flat=True))
        widening = sorted(d.pk for d in chosen if d.pk not in allowed)
        if widening:
            raise forms.ValidationError(
                _("Not a deployment of this department (a key can only narrow its list): %(ids)s."),
                code="widens",
                params={"ids": ", ".join(map(str, widening))},
            )
        return chosen

    def expires_at(self) -> Any:
        return self.cleaned_data.get("expires_at")
