"""Cross-cutting records: user profiles with roles, audit events and management API tokens."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import models, transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from appliance.jobs import Job, JobStatus  # noqa: F401 - re-exported for apps building jobs
from appliance.roles import Role


class Profile(models.Model):
    """What the console adds to a Django user: the role, and whether their password must be changed."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="profile")
    role = models.CharField(max_length=32, choices=Role.choices, default=Role.VIEWER)
    # Set for a password someone else has seen (the first admin's, printed by ensure_admin): every
    # page leads to the password change page until it is changed (appliance/middleware.py).
    must_change_password = models.BooleanField(default=False)

    class Source(models.TextChoices):
        LOCAL = "local", _("Local account")
        LDAP = "ldap", _("Directory (LDAP)")
        OIDC = "oidc", _("Directory (OpenID Connect)")

    # A directory user's role and memberships are the directory's: set again at every sign-in.
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.LOCAL)
    # The provider's stable id of an OpenID Connect user ("<issuer> <sub>"): a user name the provider
    # later gives someone else never signs that someone in to this account.
    subject = models.CharField(max_length=512, blank=True)

    def __str__(self) -> str:
        return f"{self.user} ({self.get_role_display()})"

    @staticmethod
    def password_change_required(user: Any) -> bool:
        """Whether this signed-in user must change their password before anything else."""
        if not getattr(user, "is_authenticated", False):
            return False
        profile = getattr(user, "profile", None)
        return bool(profile is not None and profile.must_change_password)

    @classmethod
    def create_user(cls, username: str, role: str, email: str = "") -> tuple[Any, str]:
        """Create a user with a role and a random first password, returned once to show once."""
        password = secrets.token_urlsafe(12)
        with transaction.atomic():
            user = get_user_model().objects.create_user(username=username, email=email, password=password)
            cls.objects.create(user=user, role=role)
        return user, password

    @classmethod
    def set_role(cls, user: Any, role: str) -> None:
        """Give ``user`` a role; it takes effect at their next request, superusers included (a
        demoted superuser also loses the flag, so nothing else treats them as an admin)."""
        with transaction.atomic():
            cls.objects.update_or_create(user=user, defaults={"role": role})
            if role != Role.APPLIANCE_ADMIN and (user.is_superuser or user.is_staff):
                user.is_superuser = user.is_staff = False
                user.save(update_fields=["is_superuser", "is_staff"])

    @staticmethod
    def is_last_admin(user: Any) -> bool:
        """Whether ``user`` is the only active appliance admin (demoting them would lock everyone out)."""
        from appliance.roles import role_of

        if role_of(user) != Role.APPLIANCE_ADMIN:
            return False
        others = get_user_model().objects.filter(is_active=True).exclude(pk=user.pk).select_related("profile")
        admins = others.filter(models.Q(profile__role=Role.APPLIANCE_ADMIN) | models.Q(profile__isnull=True,
                                                                                      is_superuser=True))  # fmt: skip
        return not admins.exists()


class AuditEventQuerySet(models.QuerySet):
    def visible_to(self, user: Any) -> AuditEventQuerySet:
        """Everything for global roles; for department roles, the events about their departments
        (and their keys) and their own actions."""
        from appliance.roles import department_events, department_ids

        ids = department_ids(user)
        if ids is None:
            return self
        mine = models.Q(actor=user) if getattr(user, "is_authenticated", False) else models.Q(pk__in=[])
        return self.filter(department_events(ids) | mine)


class AuditEvent(models.Model):
    """One change (or refused attempt) made by someone: who, what, on which target, when, from where."""

    class Outcome(models.TextChoices):
        OK = "ok", _("Done")
        DENIED = "denied", _("Denied")
        FAILED = "failed", _("Failed")

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Kept as text too, so the record survives the user's deletion.
    actor_name = models.CharField(max_length=150, blank=True, db_index=True)
    action = models.CharField(max_length=100, db_index=True)
    target_type = models.CharField(max_length=100, blank=True, db_index=True)
    target_id = models.CharField(max_length=100, blank=True)
    target_repr = models.CharField(max_length=255, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.OK, db_index=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_name or '-'} {self.action} {self.target_repr}"


TOKEN_PREFIX = "apc_"  # noqa: S105 - a public prefix, not a secret


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiTokenQuerySet(models.QuerySet):
    def usable(self) -> ApiTokenQuerySet:
        now = timezone.now()
        return self.filter(revoked_at__isnull=True, user__is_active=True).filter(
            models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=now)
        )


class ApiToken(models.Model):
    """A token for the management API. Only its hash is stored; the token is shown once."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    # The first characters after the prefix, to tell tokens apart in lists without revealing them.
    hint = models.CharField(max_length=16)
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({TOKEN_PREFIX}{self.hint}…)"

    @classmethod
    def issue(cls, user: object, name: str, expires_at: object = None) -> tuple[ApiToken, str]:
        """Create a token and return it with the raw secret, which is not stored anywhere."""
        raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(
            user=user,
            name=name,
            hint=raw[len(TOKEN_PREFIX) : len(TOKEN_PREFIX) + 6],
            token_hash=hash_token(raw),
            expires_at=expires_at,
        )
        return token, raw

    @classmethod
    def authenticate(cls, raw: str) -> ApiToken | None:
        if not raw.startswith(TOKEN_PREFIX) or len(raw) > 200:
            return None
        token = cls.objects.usable().select_related("user").filter(token_hash=hash_token(raw)).first()
        if token is not None:
            cls.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
        return token

    @property
    def state(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= timezone.now():
            return "expired"
        return "active"


class Backup(models.Model):
    """One run of ``appliance.backup.write`` (by hand or scheduled): its outcome, for the Overview."""

    class Status(models.TextChoices):
        OK = "ok", _("Succeeded")
        FAILED = "failed", _("Failed")

    class Trigger(models.TextChoices):
        SCHEDULED = "scheduled", _("Scheduled")
        MANUAL = "manual", _("By hand")

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    seconds = models.FloatField(default=0)
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.MANUAL)
    status = models.CharField(max_length=16, choices=Status.choices)
    path = models.CharField(max_length=1000, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.get_status_display()} {self.created_at:%Y-%m-%d %H:%M}"

    @classmethod
    def run(cls, trigger: str = "manual") -> Backup:
        """Write an archive, prune old ones (``BACKUP_KEEP``) and record the outcome; never raises
        for a failed backup: the row says what went wrong."""
        import time

        from appliance import backup

        started = time.perf_counter()
        try:
            written = backup.write()
            backup.prune(written.path.parent, settings.BACKUP_KEEP)
        except Exception as exc:  # a full disk, an unwritable folder, a database error: said, not raised
            return cls.objects.create(trigger=trigger, status=cls.Status.FAILED, error=f"{type(exc).__name__}: {exc}",
                                      seconds=time.perf_counter() - started)  # fmt: skip
        return cls.objects.create(
            trigger=trigger, status=cls.Status.OK, path=str(written.path), size_bytes=written.size,
            sha256=written.sha256, seconds=time.perf_counter() - started,
        )  # fmt: skip
