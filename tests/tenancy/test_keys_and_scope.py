"""Key lifecycle (expiry, revoke, rotate with grace) and tenant isolation between two departments."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from appliance.roles import Role
from tenancy.limiter import Limits
from tenancy.models import ApiKey, Department, Membership
from tests.conftest import make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_departments() -> tuple[Department, Department]:
    return Department.objects.create(name="Legal", rpm=100, tpm=10_000), Department.objects.create(name="Sales")


def test_issue_and_authenticate(two_departments: tuple) -> None:
    legal, _ = two_departments
    key, raw = ApiKey.issue(legal, "contracts bot")
    assert raw not in (key.key_hash, key.key_id) and ApiKey.authenticate(raw) == key
    assert ApiKey.authenticate(raw[:-1]) is None  # truncated
    damaged = raw[:10] + ("0" if raw[10] != "0" else "1") + raw[11:]
    assert ApiKey.authenticate(damaged) is None


def test_expiry_and_revocation(two_departments: tuple) -> None:
    legal, _ = two_departments
    _, raw_expired = ApiKey.issue(legal, "old", expires_at=timezone.now() - timedelta(seconds=1))
    assert ApiKey.authenticate(raw_expired) is None
    key, raw = ApiKey.issue(legal, "bot")
    key.revoke()
    assert ApiKey.authenticate(raw) is None


def test_rotation_keeps_the_old_key_for_the_grace_period(two_departments: tuple) -> None:
    legal, _ = two_departments
    old, old_raw = ApiKey.issue(legal, "bot", rpm=10)
    new, new_raw = old.rotate(timedelta(minutes=5))
    assert ApiKey.authenticate(old_raw) == old and ApiKey.authenticate(new_raw) == new
    assert new.rpm == 10 and old.replaced_by == new
    ApiKey.objects.filter(pk=old.pk).update(revoked_at=timezone.now() - timedelta(seconds=1))  # grace over
    assert ApiKey.authenticate(old_raw) is None and ApiKey.authenticate(new_raw) == new


def test_key_limits_only_narrow_the_department(two_departments: tuple) -> None:
    legal, _ = two_departments
    key, _ = ApiKey.issue(legal, "bot", rpm=1000, max_concurrency=2)
    assert key.limits() == Limits(rpm=100, tpm=10_000, concurrency=2)


def test_department_admin_sees_only_their_department(two_departments: tuple) -> None:
    legal, sales = two_departments
    ApiKey.issue(legal, "legal bot")
    ApiKey.issue(sales, "sales bot")
    dora = make_user("dora", Role.DEPARTMENT_ADMIN)
    Membership.objects.create(user=dora, department=legal, role=Membership.Role.ADMIN)
    assert list(Department.objects.visible_to(dora)) == [legal]
    assert [k.name for k in ApiKey.objects.visible_to(dora)] == ["legal bot"]
    admin = make_user("alice", Role.APPLIANCE_ADMIN)
    assert ApiKey.objects.visible_to(admin).count() == 2
    stranger = make_user("sam", Role.DEPARTMENT_ADMIN)  # a department admin of nothing
    assert not ApiKey.objects.visible_to(stranger).exists()


def test_viewer_membership_is_read_only(two_departments: Any) -> None:
    legal, sales = two_departments
    vic = make_user("vic", Role.DEPARTMENT_ADMIN)
    Membership.objects.create(user=vic, department=legal, role=Membership.Role.VIEWER)
    assert list(Department.objects.visible_to(vic)) == [legal]
    assert not legal.can_manage_keys(vic) and not sales.can_manage_keys(vic)
    Membership.objects.filter(user=vic).update(role=Membership.Role.ADMIN)
    assert legal.can_manage_keys(vic) and not sales.can_manage_keys(vic)
    # A department viewer's profile caps every membership at read-only.
    vic.profile.role = Role.DEPARTMENT_VIEWER
    vic.profile.save()
    assert list(Department.objects.visible_to(vic)) == [legal] and not legal.can_manage_keys(vic)
