"""Billing that cannot be poisoned: entries with NUL, bytes that are not UTF-8, numbers out of range
or no numbers at all, written straight into the usage stream among good entries of three
departments. Runs on SQLite and (in CI's second pass) PostgreSQL, whose text columns refuse NUL."""

from __future__ import annotations

import json

import pytest
import redis
from django.db.models import Sum
from django.test import Client
from django.urls import reverse

from tenancy import usage
from tenancy.models import ApiKey, Department, SetAsideUsage, UsageRecord, UsageRollup

pytestmark = pytest.mark.django_db


def good(department: Department, key: ApiKey, tokens: int) -> dict[str, str]:
    return usage.entry(department_id=department.pk, key_id=key.pk, deployment_id=None, model="tiny",
                       endpoint="chat/completions", prompt_tokens=10, completion_tokens=tokens)  # fmt: skip


def raw(department: Department, key: ApiKey, **changes: bytes | str) -> dict[str, bytes | str]:
    """An entry as a buggy or hostile writer could put it in the stream, bypassing ``usage.entry``."""
    return {**good(department, key, 5), **changes}


def test_poisoned_entries_neither_block_nor_lose_the_others(redis_db: redis.Redis) -> None:
    tenants = []
    for name in ("Legal", "Sales", "Research"):
        department = Department.objects.create(name=name)
        tenants.append((department, ApiKey.issue(department, "bot")[0]))
    (legal, legal_key), (sales, sales_key), (research, research_key) = tenants

    stream: list[dict] = [
        good(legal, legal_key, 3840),
        raw(sales, sales_key, m="tiny\x00evil"),  # NUL: PostgreSQL text refuses it
        raw(sales, sales_key, c=b"10.0.0.\xff\xfe"),  # not UTF-8
        raw(legal, legal_key, e="chat\x1b[31m/completions\u202e"),  # terminal escapes
        raw(research, research_key, ct="lots"),  # no number: set aside
        raw(research, research_key, s="-5"),  # the database refuses a negative status (CHECK)
        raw(research, research_key, pt=str(2**40)),  # out of the column's range
        raw(research, research_key, t="not a time"),
        good(sales, sales_key, 128),
        good(research, research_key, 7),
    ]
    for fields in stream:
        redis_db.xadd(usage.STREAM, fields)

    assert usage.drain(redis_db, batch=4) == 6
    assert redis_db.xlen(usage.STREAM) == 0  # every entry acknowledged: nothing is retried forever
    assert redis_db.xpending(usage.STREAM, usage.GROUP)["pending"] == 0

    billed = dict(UsageRollup.objects.filter(period="day").values("department__name")
                  .annotate(tokens=Sum("completion_tokens")).values_list("department__name", "tokens"))  # fmt: skip
    assert billed == {"Legal": 3840 + 5, "Sales": 5 + 5 + 128, "Research": 7}
    assert set(UsageRecord.objects.values_list("model", flat=True)) == {"tiny", "tinyevil"}
    assert set(UsageRecord.objects.values_list("endpoint", flat=True)) == {"chat/completions", "chat[31m/completions"}
    assert "10.0.0.\ufffd\ufffd" in set(UsageRecord.objects.values_list("client", flat=True))

    aside = list(SetAsideUsage.objects.all())
    assert len(aside) == 4 and all(json.loads(item.fields)["d"] == str(research.pk) for item in aside)
    reasons = [item.reason for item in aside]
    assert any("lots" in reason for reason in reasons) and any("not a time" in reason for reason in reasons)
    assert any(str(2**40) in reason for reason in reasons)
    assert all(reason and "\x00" not in reason for reason in reasons)

    # Billing goes on.
    redis_db.xadd(usage.STREAM, good(legal, legal_key, 1))
    assert usage.drain(redis_db) == 1
    assert UsageRollup.objects.filter(period="day", department=legal).aggregate(n=Sum("completion_tokens"))["n"] == 3846


def test_a_database_that_is_away_sets_nothing_aside(redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Down is not a refusal: nothing is acknowledged and nothing set aside; the next drain writes it."""
    from django.db import OperationalError

    department = Department.objects.create(name="Legal")
    key = ApiKey.issue(department, "bot")[0]
    redis_db.xadd(usage.STREAM, good(department, key, 9))

    def away(records: list) -> int:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(usage, "_insert", away)
    with pytest.raises(OperationalError):
        usage.drain(redis_db)
    assert SetAsideUsage.objects.count() == 0 and redis_db.xlen(usage.STREAM) == 1
    monkeypatch.undo()
    # The entry is pending for the drainer that read it; after the idle time another one claims it.
    redis_db.xclaim(usage.STREAM, usage.GROUP, "drainer", 0,
                    [e["message_id"] for e in redis_db.xpending_range(usage.STREAM, usage.GROUP, "-", "+", 10)],
                    idle=60_000)  # fmt: skip
    assert usage.drain(redis_db) == 1 and redis_db.xlen(usage.STREAM) == 0


def test_admins_see_what_was_set_aside(client: Client, admin_user: object) -> None:
    SetAsideUsage.objects.create(stream_id="1-0", reason="unreadable entry: ValueError: lots", fields='{"ct": "lots"}')
    client.force_login(admin_user)
    page = client.get(reverse("dashboard:set-aside"))
    assert page.status_code == 200 and b"unreadable entry: ValueError: lots" in page.content
    overview = client.get(reverse("dashboard:health-panel"))
    assert b"1 entry set aside" in overview.content and reverse("dashboard:set-aside").encode() in overview.content


def test_only_admins_see_what_was_set_aside(client: Client, django_user_model: object) -> None:
    from appliance.models import Profile

    user = django_user_model.objects.create_user("op", password="x")  # type: ignore[attr-defined]
    Profile.objects.update_or_create(user=user, defaults={"role": "operator"})
    client.force_login(user)
    assert client.get(reverse("dashboard:set-aside")).status_code == 403
