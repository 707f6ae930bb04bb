"""Departments, their members and API keys. Tenant scoping lives in one place: the
``visible_to(user)`` queryset methods (backed by ``appliance.roles.department_ids``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from appliance.archiving import delete_or_archive
from appliance.roles import can, department_ids
from tenancy import keys
from tenancy.limiter import Limits


class DepartmentQuerySet(models.QuerySet):
    def visible_to(self, user: Any) -> DepartmentQuerySet:
        ids = department_ids(user)
        return self if ids is None else self.filter(pk__in=ids)

    def active(self) -> DepartmentQuerySet:
        """Not archived: what lists and pickers show (reports read archived ones too)."""
        return self.filter(archived_at__isnull=True)


class Department(models.Model):
    """A team sharing the appliance: its quotas and which deployed models it may use.

    Deleting a department that usage refers to archives it (``remove()``): its keys are revoked and
    archived, it leaves the departments list and API, but its row stays, so past usage pages, CSV
    exports and chargeback read exactly as before. Its name stays reserved: past bills show it, and a
    new department of the same name would be indistinguishable from it there. A department nothing
    refers to is really deleted, with its keys and memberships."""

    class Priority(models.TextChoices):
        HIGH = "high", _("High")
        NORMAL = "normal", _("Normal")
        LOW = "low", _("Low")

    name = models.CharField(_("name"), max_length=100, unique=True)
    contact = models.CharField(_("contact"), max_length=200, blank=True)
    priority = models.CharField(_("priority"), max_length=8, choices=Priority.choices, default=Priority.NORMAL)
    deployments = models.ManyToManyField(
        "provisioning.Deployment", verbose_name=_("deployments"), blank=True, related_name="departments"
    )
    rpm = models.PositiveIntegerField(_("requests per minute"), null=True, blank=True)
    tpm = models.PositiveIntegerField(_("tokens per minute"), null=True, blank=True)
    tokens_per_day = models.PositiveBigIntegerField(_("tokens per day"), null=True, blank=True)
    tokens_per_month = models.PositiveBigIntegerField(_("tokens per month"), null=True, blank=True)
    max_concurrency = models.PositiveIntegerField(_("concurrent requests"), null=True, blank=True)
    max_tokens_per_request = models.PositiveIntegerField(_("most tokens per request"), null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    archived_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = DepartmentQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def limits(self) -> Limits:
        return Limits(self.rpm, self.tpm, self.tokens_per_day, self.tokens_per_month, self.max_concurrency)

    def remove(self) -> str:
        """Delete it, or archive it when usage refers to it; returns ``"deleted"`` or ``"archived"``."""
        return delete_or_archive(self, self.archive)

    def archive(self) -> None:
        """Keep the row for the bills; its keys stop working at once."""
        now = timezone.now()
        with transaction.atomic():
            for key in self.api_keys.filter(archived_at__isnull=True):
                key.archive(now)
            Department.objects.filter(pk=self.pk).update(archived_at=now)
        self.archived_at = now

    # Who may do what to it: ``appliance.roles``' table, with this department as the scope.

    def can_manage_keys(self, user: Any) -> bool:
        """Issue, rotate, revoke: appliance admins, and this department's admins (admin membership)."""
        return can(user, "api_key.manage", self)

    def can_manage(self, user: Any) -> bool:
        """Quotas, allowed deployments, deletion."""
        return can(user, "department.manage", self)

    def can_manage_members(self, user: Any) -> bool:
        return can(user, "member.manage", self)


class Membership(models.Model):
    class Role(models.TextChoices):
        ADMIN = "department_admin", _("Department admin")
        VIEWER = "viewer", _("Viewer")

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    department = models.ForeignKey(Department, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=20, choices=Role.choices, default=Role.VIEWER)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "department"], name="one_membership_per_department")]

    def __str__(self) -> str:
        return f"{self.user} in {self.department} ({self.get_role_display()})"


class ApiKeyQuerySet(models.QuerySet):
    def visible_to(self, user: Any) -> ApiKeyQuerySet:
        ids = department_ids(user)
        return self if ids is None else self.filter(department_id__in=ids)

    def active(self) -> ApiKeyQuerySet:
        """Not archived: what a department's key list shows (reports read archived ones too)."""
        return self.filter(archived_at__isnull=True)


class ApiKey(models.Model):
    """A key issued to a department for a team or an application. Only its hash is stored.

    It may use every deployment of its department (``all_deployments``, now and later) or exactly
    those in ``deployments`` (still only those its department may use); with the flag off, an empty
    list allows nothing, also when the last deployment of the list was deleted.

    Deleting a key that usage refers to archives it (``remove()``): it is revoked and leaves the key
    lists, but its row stays for the bills. Key names need not be unique, so nothing is reserved."""

    department = models.ForeignKey(Department, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(_("name"), max_length=100)
    key_id = models.CharField(max_length=keys.ID_LENGTH, unique=True)
    key_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    # Rotation: the old key keeps working until ``grace_until``, then counts as revoked; the page and
    # the API offer the same longest grace and the same default.
    ROTATION_GRACE_MAX_MINUTES = 7 * 24 * 60
    ROTATION_GRACE_DEFAULT_MINUTES = 60
    replaced_by = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replaces"
    )
    grace_until = models.DateTimeField(null=True, blank=True)
    # Optional limits that can only narrow the department's.
    rpm = models.PositiveIntegerField(_("requests per minute"), null=True, blank=True)
    tpm = models.PositiveIntegerField(_("tokens per minute"), null=True, blank=True)
    max_concurrency = models.PositiveIntegerField(_("concurrent requests"), null=True, blank=True)
    max_tokens_per_request = models.PositiveIntegerField(_("most tokens per request"), null=True, blank=True)
    all_deployments = models.BooleanField(
        _("all of the department's deployments"),
        default=True,
        help_text=_("Every deployment the department may use, now and later. Off: only those chosen below."),
    )
    deployments = models.ManyToManyField(
        "provisioning.Deployment", verbose_name=_("deployments"), blank=True, related_name="+"
    )
    archived_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({keys.PREFIX}{self.key_id[:4]}…)"

    @classmethod
    def issue(
        cls, department: Department, name: str, user: Any = None, deployments: Any = (), **fields: Any
    ) -> tuple[ApiKey, str]:
        """Create a key; returns it with the raw secret, shown once and stored nowhere."""
        generated = keys.generate()
        with transaction.atomic():
            key = cls.objects.create(
                department=department,
                name=name,
                key_id=generated.key_id,
                key_hash=generated.hash,
                created_by=user,
                **fields,
            )
            if deployments:
                key.deployments.set(deployments)
        return key, generated.raw

    @classmethod
    def authenticate(cls, raw: str) -> ApiKey | None:
        """The usable key for ``raw``, or None (malformed, unknown, revoked, expired, rotated out)."""
        try:
            parsed = keys.parse(raw)
        except keys.MalformedKey:
            return None
        key = cls.objects.select_related("department").filter(key_id=parsed.key_id).first()
        if key is None or not keys.matches(raw, key.key_hash) or not key.is_usable:
            return None
        return key

    @property
    def is_usable(self) -> bool:
        now = timezone.now()
        if self.archived_at is not None:
            return False
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.expires_at is None or self.expires_at > now

    def can_manage(self, user: Any) -> bool:
        """Rotate or revoke it: whoever may manage its department's keys."""
        return self.department.can_manage_keys(user)

    def revoke(self) -> None:
        self.revoked_at = timezone.now()
        self.save(update_fields=["revoked_at"])

    def remove(self) -> str:
        """Delete it, or archive it when usage refers to it; returns ``"deleted"`` or ``"archived"``."""
        return delete_or_archive(self, self.archive)

    def archive(self, now: Any = None) -> None:
        """Revoke it (a grace period ends too) and keep the row for the bills."""
        now = now or timezone.now()
        if self.revoked_at is None or self.revoked_at > now:
            self.revoked_at = now
        self.archived_at = now
        self.save(update_fields=["revoked_at", "archived_at"])

    def rotate(self, grace: timedelta, user: Any = None) -> tuple[ApiKey, str]:
        """A new key with the same settings; this one keeps working for ``grace``."""
        with transaction.atomic():
            new, raw = ApiKey.issue(
                self.department, self.name, user, expires_at=self.expires_at, rpm=self.rpm, tpm=self.tpm,
                max_concurrency=self.max_concurrency, max_tokens_per_request=self.max_tokens_per_request,
                all_deployments=self.all_deployments,
            )  # fmt: skip
            new.deployments.set(self.deployments.all())
            self.replaced_by = new
            self.grace_until = timezone.now() + grace
            self.revoked_at = self.grace_until
            self.save(update_fields=["replaced_by", "grace_until", "revoked_at"])
        return new, raw

    def own_limits(self) -> Limits:
        """The key's own limits (counted for this key alone, on top of the department's)."""
        return Limits(self.rpm, self.tpm, None, None, self.max_concurrency)

    def limits(self) -> Limits:
        """The limits in effect for this key: the department's, narrowed by the key's own."""
        return self.department.limits().narrowed(self.own_limits())

    def max_tokens_cap(self) -> int | None:
        caps = [c for c in (self.department.max_tokens_per_request, self.max_tokens_per_request) if c]
        return min(caps) if caps else None

    def allowed_deployment_ids(self) -> set[int]:
        """The department's deployments, or those of them in the key's list when ``all_deployments`` is
        off (an empty list: none). Archived deployments, keys and departments allow nothing."""
        if self.archived_at is not None or self.department.archived_at is not None:
            return set()
        allowed = set(self.department.deployments.filter(archived_at__isnull=True).values_list("pk", flat=True))
        if self.all_deployments:
            return allowed
        return allowed & set(self.deployments.values_list("pk", flat=True))


class UsageRecord(models.Model):
    """One request the gateway handled. Written off the hot path: the gateway appends to a Redis
    stream, ``tenancy.usage.drain`` copies it here in batches (``stream_id`` makes that idempotent)."""

    stream_id = models.CharField(max_length=40, unique=True)
    created_at = models.DateTimeField()
    # PROTECT: what a bill refers to is archived, never deleted (``appliance.archiving``).
    department = models.ForeignKey(Department, null=True, on_delete=models.PROTECT, related_name="usage_records")
    api_key = models.ForeignKey(ApiKey, null=True, on_delete=models.PROTECT, related_name="usage_records")
    deployment = models.ForeignKey("provisioning.Deployment", null=True, on_delete=models.PROTECT, related_name="+")
    model = models.CharField(max_length=200)
    endpoint = models.CharField(max_length=40)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.FloatField(default=0)
    ttft_ms = models.FloatField(null=True, blank=True)
    status = models.PositiveSmallIntegerField()
    error = models.CharField(max_length=60, blank=True)
    client = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["department", "created_at"]), models.Index(fields=["created_at"])]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.model} {self.status}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class SetAsideUsage(models.Model):
    """A usage entry the database refused (``tenancy.usage.drain`` tried it alone and it still
    failed): kept here with the reason, never blocking the entries after it, for an admin to read.
    ``fields`` is the stream entry as ASCII-escaped JSON, so whatever made the row fail (a NUL, a
    byte that is not UTF-8) is kept visibly and cannot fail again."""

    stream_id = models.CharField(max_length=40, unique=True)
    set_aside_at = models.DateTimeField(auto_now_add=True)
    reason = models.CharField(max_length=500)
    fields = models.TextField()

    class Meta:
        ordering = ["-set_aside_at"]

    def __str__(self) -> str:
        return f"{self.stream_id}: {self.reason}"


_REPORTED = ["api_key", "model", "requests", "errors", "prompt_tokens", "completion_tokens", "latency_ms_sum",
             "ttft_ms_sum", "ttft_count"]  # fmt: skip


def price_detail(price: ModelPrice) -> dict[str, str]:
    """A price's figures as the audit log keeps them."""
    return {name: str(getattr(price, name)) for name in ("prompt_per_million", "completion_per_million", "gpu_hour")}


class UsageRollup(models.Model):
    """Usage summed per hour and per day, per department, key and model (what reports read)."""

    class Period(models.TextChoices):
        HOUR = "hour", _("Hour")
        DAY = "day", _("Day")

    period = models.CharField(max_length=4, choices=Period.choices)
    start = models.DateTimeField()
    department = models.ForeignKey(Department, on_delete=models.PROTECT, related_name="rollups")
    api_key = models.ForeignKey(ApiKey, on_delete=models.PROTECT, related_name="rollups")
    model = models.CharField(max_length=200)
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0)
    ttft_ms_sum = models.FloatField(default=0)
    ttft_count = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["period", "start", "department", "api_key", "model"], name="one_rollup_row")
        ]
        # What a report reads: one period's rows over a range of time (of some departments), and
        # every column it groups by or sums, so the database answers from the index alone instead
        # of visiting each row (a month of reports reads 1.5 to 2 times faster, SQLite and PostgreSQL).
        indexes = [
            models.Index(fields=["period", "start", "department", *_REPORTED], name="usagerollup_report"),
            models.Index(fields=["period", "department", "start", *_REPORTED], name="usagerollup_report_dept"),
        ]

    def __str__(self) -> str:
        return f"{self.period} {self.start:%Y-%m-%d %H:00} {self.model}"


class DeploymentHours(models.Model):
    """GPU time a deployment held, per hour (for chargeback), accumulated by a beat task."""

    deployment = models.ForeignKey("provisioning.Deployment", on_delete=models.PROTECT, related_name="hours")
    start = models.DateTimeField()
    replica_seconds = models.FloatField(default=0)
    gpu_seconds = models.FloatField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["deployment", "start"], name="one_hours_row")]

    def __str__(self) -> str:
        return f"{self.deployment_id} {self.start:%Y-%m-%d %H:00}"


class ModelPrice(models.Model):
    """What a served model costs a department: per million prompt / completion tokens, and per GPU-hour
    its deployment holds (shared among departments by their token share)."""

    model = models.CharField(_("served model name"), max_length=200, unique=True)
    prompt_per_million = models.DecimalField(
        _("price per 1M prompt tokens"), max_digits=12, decimal_places=4, default=0
    )
    completion_per_million = models.DecimalField(
        _("price per 1M completion tokens"), max_digits=12, decimal_places=4, default=0
    )
    gpu_hour = models.DecimalField(_("price per GPU-hour"), max_digits=12, decimal_places=4, default=0)

    class Meta:
        ordering = ["model"]

    def __str__(self) -> str:
        return self.model

    @staticmethod
    def visible_to(user: Any) -> models.QuerySet:
        """Every price for global roles; for department roles, those of the deployments they may use."""
        from provisioning.models import Deployment

        prices = ModelPrice.objects.all()
        if department_ids(user) is None:
            return prices
        return prices.filter(model__in=Deployment.objects.visible_to(user).values("name"))

    @staticmethod
    def can_set(user: Any) -> bool:
        """Prices apply to every department's bill: appliance admins only."""
        return can(user, "price.set")


class PlaygroundKey(models.Model):
    """The key the console's playground calls the gateway with for a department: an ordinary key of
    the department (listed with its keys, limited and billed like any other, revocable), whose
    secret the console keeps sealed because it must use it again. A revoked or deleted one is
    replaced by a new one at the next use."""

    NAME = "Console playground"

    department = models.OneToOneField(Department, on_delete=models.CASCADE, related_name="playground_key")
    key = models.OneToOneField(ApiKey, on_delete=models.CASCADE, related_name="+")
    secret_sealed = models.TextField()

    def __str__(self) -> str:
        return f"{self.department} playground"

    @classmethod
    def secret_for(cls, department: Department) -> str:
        """The raw key to call the gateway with on the department's behalf (made when missing)."""
        from appliance.sealing import seal, unseal

        with transaction.atomic():
            found = cls.objects.select_for_update().select_related("key").filter(department=department).first()
            if found is not None and found.key.is_usable:
                return unseal(found.secret_sealed)
            if found is not None:
                found.delete()
            key, raw = ApiKey.issue(department, cls.NAME)
            cls.objects.create(department=department, key=key, secret_sealed=seal(raw))
            return raw
