"""Usage reports, CSV exports and chargeback: totals from drained entries, hourly vs daily rows,
money to the cent with two departments sharing a deployment's GPU-hours, isolation between two
departments, and every bad filter refused with a form error."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis
from asgiref.sync import async_to_sync
from django.contrib.staticfiles import finders
from django.test import AsyncClient, Client
from django.urls import reverse

from appliance.models import AuditEvent
from appliance.roles import Role
from tenancy import reports, usage
from tenancy.models import ApiKey, Department, DeploymentHours, Membership, ModelPrice, UsageRollup
from tests.conftest import make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(admin_user: Any) -> dict[str, Any]:
    legal, sales = Department.objects.create(name="Legal"), Department.objects.create(name="Sales")
    legal_key, _ = ApiKey.issue(legal, "contracts bot")
    sales_key, _ = ApiKey.issue(sales, "crm bot")
    dora = make_user("dora", Role.DEPARTMENT_ADMIN)
    Membership.objects.create(user=dora, department=legal, role=Membership.Role.ADMIN)
    dora_client = Client()
    dora_client.force_login(dora)
    return {"legal": legal, "sales": sales, "legal_key": legal_key, "sales_key": sales_key, "dora": dora,
            "dora_client": dora_client, "admin": admin_user}  # fmt: skip


def _at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def _send(client: redis.Redis, key: ApiKey, at: datetime, model: str = "tiny", n: int = 1, **extra: Any) -> None:
    for _ in range(n):
        fields = {"department_id": key.department_id, "key_id": key.pk, "deployment_id": None, "model": model,
                  "endpoint": "chat/completions", "prompt_tokens": 100, "completion_tokens": 20,
                  "latency_ms": 50.0, "ttft_ms": 10.0, "at": at.timestamp()} | extra  # fmt: skip
        usage.publish(client, usage.entry(**fields))


def _rollup(period: str, start: datetime, key: ApiKey, model: str = "tiny", **values: int) -> UsageRollup:
    return UsageRollup.objects.create(
        period=period, start=start, department_id=key.department_id, api_key=key, model=model, **values
    )


def _csv(response: Any) -> list[list[str]]:
    return list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))


# Report queries


def test_totals_and_breakdowns_from_drained_entries(redis_db: redis.Redis, world: dict) -> None:
    legal_key, sales_key = world["legal_key"], world["sales_key"]
    _send(redis_db, legal_key, _at(2025, 3, 3, 9, 15), n=3)
    _send(redis_db, legal_key, _at(2025, 3, 4, 18, 0), model="big", prompt_tokens=1000, completion_tokens=0)
    _send(redis_db, legal_key, _at(2025, 3, 4, 18, 5), status=500, error="upstream", prompt_tokens=0,
          completion_tokens=0, ttft_ms=None)  # fmt: skip
    _send(redis_db, sales_key, _at(2025, 3, 5, 0, 0), n=2)
    _send(redis_db, sales_key, _at(2025, 3, 9, 0, 0))  # after the range
    assert usage.drain(redis_db) == 8

    span = reports.Range(date(2025, 3, 3), date(2025, 3, 7))
    assert span.period == "day" and span.days == 5
    rows = reports.scoped_rollups(world["admin"], span)
    total = reports.totals(rows)
    assert (total.requests, total.errors, total.prompt_tokens, total.completion_tokens) == (7, 1, 1500, 100)
    assert total.avg_latency_ms == pytest.approx(50.0) and total.avg_ttft_ms == pytest.approx(10.0)

    by_department = {t.label: (t.requests, t.tokens) for t in reports.breakdown(rows, "department")}
    assert by_department == {"Legal": (5, 1360), "Sales": (2, 240)}
    by_model = {t.label: t.tokens for t in reports.breakdown(rows, "model")}
    assert by_model == {"tiny": 600, "big": 1000}
    by_key = [t.label for t in reports.breakdown(rows, "key")]
    assert by_key[0].startswith("Legal · contracts bot") and by_key[1].startswith("Sales · crm bot")

    only_sales = reports.scoped_rollups(world["admin"], span, [world["sales"].pk])
    assert reports.totals(only_sales).requests == 2

    chart = reports.series(rows, "department", span)
    assert chart["labels"] == ["2025-03-03", "2025-03-04", "2025-03-05", "2025-03-06", "2025-03-07"]
    tokens = {s["label"]: s["data"] for s in chart["tokens"]}
    assert tokens == {"Legal": [360, 1000, 0, 0, 0], "Sales": [0, 0, 240, 0, 0]}
    assert chart["requests"][0]["data"] == [3, 2, 2, 0, 0] and chart["requests"][1]["data"] == [0, 1, 0, 0, 0]


def test_two_days_read_hourly_rows_longer_ranges_daily_rows(world: dict) -> None:
    """The hour and day rows below disagree on purpose, to show which ones a range reads."""
    key = world["legal_key"]
    _rollup("hour", _at(2025, 3, 4, 23), key, requests=1, prompt_tokens=5)
    _rollup("hour", _at(2025, 3, 5, 1), key, requests=2, prompt_tokens=7)
    _rollup("day", _at(2025, 3, 4), key, requests=50, prompt_tokens=500)
    _rollup("day", _at(2025, 3, 5), key, requests=70, prompt_tokens=700)

    two_days = reports.Range(date(2025, 3, 4), date(2025, 3, 5))
    rows = reports.scoped_rollups(world["admin"], two_days)
    assert two_days.period == "hour" and reports.totals(rows).prompt_tokens == 12
    chart = reports.series(rows, "model", two_days)
    assert len(chart["labels"]) == 48 and chart["labels"][23] == "03-04 23:00"
    assert chart["tokens"][0]["data"][23] == 5 and chart["tokens"][0]["data"][25] == 7

    one_day = reports.Range(date(2025, 3, 5), date(2025, 3, 5))
    assert reports.totals(reports.scoped_rollups(world["admin"], one_day)).prompt_tokens == 7

    three_days = reports.Range(date(2025, 3, 4), date(2025, 3, 6))
    assert three_days.period == "day"
    assert reports.totals(reports.scoped_rollups(world["admin"], three_days)).prompt_tokens == 1200


def test_chart_keeps_the_largest_groups_and_sums_the_rest(world: dict) -> None:
    key = world["legal_key"]
    for i in range(reports.CHART_SERIES + 3):
        _rollup("day", _at(2025, 3, 4), key, model=f"m{i:02d}", prompt_tokens=100 + i)
    span = reports.Range(date(2025, 3, 4), date(2025, 3, 6))
    chart = reports.series(reports.scoped_rollups(world["admin"], span), "model", span)
    labels = [s["label"] for s in chart["tokens"]]
    assert len(labels) == reports.CHART_SERIES and labels[0] == "m10" and labels[-1] == "Other"
    assert sum(s["data"][0] for s in chart["tokens"]) == sum(100 + i for i in range(reports.CHART_SERIES + 3))


def test_ranges_refuse_reversed_or_too_long_spans() -> None:
    with pytest.raises(ValueError):
        reports.Range(date(2025, 3, 5), date(2025, 3, 4))
    with pytest.raises(ValueError):
        reports.Range(date(2024, 1, 1), date(2025, 2, 4))
    assert reports.Range(date(2024, 1, 1), date(2025, 2, 3)).days == 400


# Usage page and CSV


def test_usage_page_defaults_to_the_last_seven_days(redis_db: redis.Redis, admin_client: Client, world: dict) -> None:
    now = datetime.now(UTC)
    _send(redis_db, world["legal_key"], now, n=2)
    _send(redis_db, world["sales_key"], now)
    usage.drain(redis_db)
    response = admin_client.get(reverse("tenancy:usage"))
    assert response.status_code == 200
    span = response.context["span"]
    assert span.last == now.date() and span.days == 7 and span.period == "day"
    assert [(t.label, t.requests) for t in response.context["breakdown"]] == [("Legal", 2), ("Sales", 1)]
    page = response.content.decode()
    assert 'id="usage-chart-data"' in page and "tenancy/usage.js" in page and "chart-4.6.1.umd.min.js" in page
    assert f"start={span.first:%Y-%m-%d}" in response.context["query"]
    assert reverse("tenancy:usage-csv") in page

    other_format = admin_client.get(reverse("tenancy:usage"), {"end": "03/10/2025"})
    assert other_format.context["span"] == reports.Range(date(2025, 3, 4), date(2025, 3, 10))

    by_model = admin_client.get(reverse("tenancy:usage"), {"group": "model", "department": world["sales"].pk})
    assert [(t.label, t.requests) for t in by_model.context["breakdown"]] == [("tiny", 1)]


def test_viewers_see_every_departments_usage(redis_db: redis.Redis, viewer_client: Client, world: dict) -> None:
    _send(redis_db, world["legal_key"], datetime.now(UTC))
    _send(redis_db, world["sales_key"], datetime.now(UTC))
    usage.drain(redis_db)
    response = viewer_client.get(reverse("tenancy:usage"))
    assert {t.label for t in response.context["breakdown"]} == {"Legal", "Sales"}
    assert viewer_client.get(reverse("tenancy:chargeback")).status_code == 200


def test_usage_csv_has_a_header_and_one_line_per_rollup_row(admin_client: Client, world: dict) -> None:
    legal_key, sales_key = world["legal_key"], world["sales_key"]
    _rollup("day", _at(2025, 3, 4), legal_key, requests=3, errors=1, prompt_tokens=300, completion_tokens=60,
            latency_ms_sum=150.5, ttft_ms_sum=20.0, ttft_count=2)  # fmt: skip
    _rollup("day", _at(2025, 3, 5), sales_key, model="big", requests=1, prompt_tokens=10)
    _rollup("day", _at(2025, 3, 9), sales_key, requests=1)  # outside the range
    _rollup("hour", _at(2025, 3, 4, 10), legal_key, requests=3)  # the other period
    response = admin_client.get(reverse("tenancy:usage-csv"), {"start": "2025-03-01", "end": "2025-03-07"})
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="usage-2025-03-01_2025-03-07.csv"'
    lines = _csv(response)
    assert lines[0] == reports.USAGE_CSV_HEADER
    assert len(lines) == 3
    legal = dict(zip(lines[0], lines[1], strict=True))
    assert legal["period"] == "day" and legal["start"] == "2025-03-04T00:00:00+00:00"
    assert (legal["department"], legal["api_key_id"], legal["model"]) == ("Legal", str(legal_key.pk), "tiny")
    assert (legal["requests"], legal["errors"], legal["prompt_tokens"], legal["completion_tokens"]) == (
        "3", "1", "300", "60")  # fmt: skip
    assert (legal["total_tokens"], legal["latency_ms_sum"], legal["ttft_count"]) == ("360", "150.5", "2")
    assert dict(zip(lines[0], lines[2], strict=True))["department"] == "Sales"

    hourly = _csv(admin_client.get(reverse("tenancy:usage-csv"), {"start": "2025-03-04", "end": "2025-03-04"}))
    assert len(hourly) == 2 and hourly[1][0] == "hour" and hourly[1][1] == "2025-03-04T10:00:00+00:00"


def test_usage_csv_streams_in_chunks_under_asgi(world: dict) -> None:
    """Served by ASGI, the CSV comes from an async iterator (a sync one would be read whole first)."""
    key = world["legal_key"]
    day = {"period": "day", "start": _at(2025, 3, 4), "department": world["legal"], "api_key": key, "requests": 1}
    UsageRollup.objects.bulk_create(UsageRollup(model=f"m{i:04d}", **day) for i in range(1200))
    client = AsyncClient()
    client.force_login(world["admin"])

    async def fetch() -> tuple[Any, list[bytes]]:
        response = await client.get(reverse("tenancy:usage-csv"), {"start": "2025-03-01", "end": "2025-03-07"})
        return response, [chunk async for chunk in response.streaming_content]

    response, chunks = async_to_sync(fetch)()
    assert response.status_code == 200 and response.is_async and len(chunks) == 3
    lines = list(csv.reader(io.StringIO(b"".join(chunks).decode())))
    assert lines[0] == reports.USAGE_CSV_HEADER and len(lines) == 1201 and lines[-1][6] == "m1199"


def test_csv_cells_that_a_spreadsheet_would_run_are_defused(admin_client: Client) -> None:
    department = Department.objects.create(name="=HYPERLINK(1)")
    key, _ = ApiKey.issue(department, "@sum")
    _rollup("day", _at(2025, 3, 4), key, model="-1+1", requests=1)
    lines = _csv(admin_client.get(reverse("tenancy:usage-csv"), {"start": "2025-03-04", "end": "2025-03-06"}))
    row = dict(zip(lines[0], lines[1], strict=True))
    assert row["department"] == "'=HYPERLINK(1)" and row["api_key"].startswith("'@sum") and row["model"] == "'-1+1"


BAD_FILTERS = [
    ({"start": "2025-02-30"}, "start", "valid date"),
    ({"start": "yesterday", "end": "2025-03-01"}, "start", "valid date"),
    ({"end": "2025-13-01"}, "end", "valid date"),
    ({"start": "2025-03-05", "end": "2025-03-04"}, "end", "must not be before"),
    ({"start": "2024-01-01", "end": "2025-02-04"}, "end", "at most 400 days"),
    ({"start": "1999-12-31", "end": "2000-01-02"}, "start", "between"),
    ({"start": "9999-12-30", "end": "9999-12-31"}, "start", "between"),
    ({"department": "99999"}, "department", "not one of the available choices"),
    ({"department": "99999999999999999999999"}, "department", "not one of the available choices"),
    ({"department": "abc"}, "department", "not a valid value"),
    ({"group": "password"}, "group", "not one of the available choices"),
]


@pytest.mark.parametrize(("query", "field", "message"), BAD_FILTERS)
@pytest.mark.parametrize("name", ["tenancy:usage", "tenancy:usage-csv"])
def test_bad_filters_get_a_form_error(admin_client: Client, world: dict, name: str, query: dict, field: str,
                                      message: str) -> None:  # fmt: skip
    _rollup("day", _at(2025, 3, 4), world["sales_key"], requests=1)
    response = admin_client.get(reverse(name), query)
    assert response.status_code == (400 if name.endswith("csv") else 200)
    assert not response.streaming and response["Content-Type"].startswith("text/html")
    errors = response.context["form"].errors
    assert list(errors) == [field] and message in " ".join(errors[field])
    assert message in response.content.decode().replace("&quot;", '"')
    assert "breakdown" not in response.context


# Isolation


def test_department_admin_sees_only_their_department(redis_db: redis.Redis, world: dict) -> None:
    dora, legal, sales = world["dora_client"], world["legal"], world["sales"]
    now = datetime.now(UTC)
    _send(redis_db, world["legal_key"], now)
    _send(redis_db, world["sales_key"], now, n=4, model="secret-model")
    usage.drain(redis_db)

    page = dora.get(reverse("tenancy:usage"), {"group": "model"})
    assert [t.label for t in page.context["breakdown"]] == ["tiny"]
    assert "secret-model" not in page.content.decode() and "Sales" not in page.content.decode()
    assert [d.name for d in page.context["form"].fields["department"].queryset] == ["Legal"]
    by_key = dora.get(reverse("tenancy:usage"), {"group": "key"})
    assert [t.label[:21] for t in by_key.context["breakdown"]] == ["Legal · contracts bot"]

    lines = _csv(dora.get(reverse("tenancy:usage-csv")))
    assert len(lines) == 2 and lines[1][3] == "Legal"

    for name in ("tenancy:usage", "tenancy:usage-csv"):
        for guess in ([sales.pk], [legal.pk, sales.pk]):
            response = dora.get(reverse(name), {"department": guess, "group": "model"})
            assert response.status_code in (200, 400) and "department" in response.context["form"].errors
            assert not response.streaming and "breakdown" not in response.context
            assert "secret-model" not in response.content.decode()

    # The query layer itself narrows to what the user may see, whatever ids it is given.
    span = reports.Range.last_days(7)
    assert reports.totals(reports.scoped_rollups(world["dora"], span, [sales.pk])).requests == 0
    assert reports.totals(reports.scoped_rollups(world["dora"], span)).requests == 1


def test_user_without_a_role_or_membership_sees_nothing(redis_db: redis.Redis, world: dict) -> None:
    """A department admin who is a member of no department gets empty reports, not everyone's."""
    lone = make_user("lone", Role.DEPARTMENT_ADMIN)
    _send(redis_db, world["sales_key"], datetime.now(UTC))
    usage.drain(redis_db)
    client = Client()
    client.force_login(lone)
    assert client.get(reverse("tenancy:usage")).context["breakdown"] == []
    assert len(_csv(client.get(reverse("tenancy:usage-csv")))) == 1
    assert client.get(reverse("tenancy:chargeback")).context["report"].departments == []


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("page", ["tenancy:usage", "tenancy:chargeback", "tenancy:list"])
def test_report_pages_render_for_every_role(client: Client, role: Role, page: str) -> None:
    client.force_login(make_user("u", role))
    response = client.get(reverse(page))
    assert response.status_code == 200 and 'aria-current="page"' in response.content.decode()
    assert (reverse("tenancy:set-price") in response.content.decode()) == (
        page == "tenancy:chargeback" and role == Role.APPLIANCE_ADMIN
    )


def test_chart_script_is_served_locally(client: Client) -> None:
    assert finders.find("tenancy/usage.js")
    assert client.get("/static/tenancy/usage.js").status_code == 200


def test_reports_need_a_login(client: Client) -> None:
    for name in ("tenancy:usage", "tenancy:usage-csv", "tenancy:chargeback", "tenancy:chargeback-csv"):
        response = client.get(reverse(name))
        assert response.status_code == 302 and "login" in response["Location"]


# Department page


def test_department_page_shows_its_last_30_days(redis_db: redis.Redis, world: dict) -> None:
    now = datetime.now(UTC)
    _send(redis_db, world["legal_key"], now, n=2)
    _send(redis_db, world["sales_key"], now, model="secret-model")
    usage.drain(redis_db)
    response = world["dora_client"].get(reverse("tenancy:detail", args=[world["legal"].pk]))
    assert response.status_code == 200
    panel = response.context["usage"]
    assert panel["span"].days == 30 and panel["span"].period == "day"
    assert [(t.label, t.requests) for t in panel["by_model"]] == [("tiny", 2)]
    assert panel["by_key"][0].label.startswith("Legal · contracts bot")
    page = response.content.decode()
    assert 'id="department-usage-data"' in page and "secret-model" not in page
    data = json.loads(page.split('id="department-usage-data" type="application/json">')[1].split("</script>")[0])
    assert len(data["labels"]) == 30 and data["tokens"] == [{"label": "tiny", "data": [0] * 29 + [240]}]
    assert world["dora_client"].get(reverse("tenancy:detail", args=[world["sales"].pk])).status_code == 404


def test_departments_list_links_to_usage_and_chargeback(admin_client: Client) -> None:
    page = admin_client.get(reverse("tenancy:list")).content.decode()
    assert reverse("tenancy:usage") in page and reverse("tenancy:chargeback") in page


# Chargeback


@pytest.fixture
def march(world: dict, deployment_factory: Any) -> dict[str, Any]:
    """March 2025: Legal and Sales share "tiny" (10 GPU-hours at 2.50); "big" ran unused for 3 hours."""
    tiny, big = deployment_factory("tiny"), deployment_factory("big")
    ModelPrice.objects.create(model="tiny", prompt_per_million=Decimal("0.50"), completion_per_million=Decimal("1.50"),
                              gpu_hour=Decimal("2.50"))  # fmt: skip
    ModelPrice.objects.create(model="big", gpu_hour=Decimal("4.00"))
    legal_key, sales_key = world["legal_key"], world["sales_key"]
    _rollup("day", _at(2025, 3, 1), legal_key, prompt_tokens=1_000_000, completion_tokens=500_000)
    _rollup("day", _at(2025, 3, 31), legal_key, prompt_tokens=500_000)
    _rollup("day", _at(2025, 3, 15), sales_key, prompt_tokens=1_000_000)
    _rollup("day", _at(2025, 3, 15), sales_key, model="unpriced", prompt_tokens=123)
    _rollup("day", _at(2025, 2, 28), legal_key, prompt_tokens=9_000_000)  # other months
    _rollup("day", _at(2025, 4, 1), sales_key, prompt_tokens=9_000_000)
    _rollup("hour", _at(2025, 3, 15, 10), sales_key, prompt_tokens=9_000_000)  # hourly rows are not read
    DeploymentHours.objects.create(deployment=tiny, start=_at(2025, 3, 1, 0), gpu_seconds=7200.0)
    DeploymentHours.objects.create(deployment=tiny, start=_at(2025, 3, 31, 23), gpu_seconds=28800.0)
    DeploymentHours.objects.create(deployment=tiny, start=_at(2025, 4, 1, 0), gpu_seconds=99999.0)
    DeploymentHours.objects.create(deployment=big, start=_at(2025, 3, 2, 5), gpu_seconds=10800.0)
    return world


def test_chargeback_to_the_cent(march: dict) -> None:
    report = reports.chargeback(march["admin"], date(2025, 3, 1))
    legal, sales = report.departments
    assert legal.department.name == "Legal" and sales.department.name == "Sales"
    (tiny,) = legal.lines
    # 1.5M prompt × 0.50 + 0.5M completion × 1.50; 2/3 of 10 GPU-hours × 2.50 = 16.666… → 16.67
    assert (tiny.prompt_tokens, tiny.completion_tokens) == (1_500_000, 500_000)
    assert (tiny.token_cost, tiny.gpu_hours, tiny.gpu_cost, tiny.total) == (
        Decimal("1.50"), Decimal("6.667"), Decimal("16.67"), Decimal("18.17"))  # fmt: skip
    lines = {line.model: line for line in sales.lines}
    assert (lines["tiny"].token_cost, lines["tiny"].gpu_hours, lines["tiny"].gpu_cost) == (
        Decimal("0.50"), Decimal("3.333"), Decimal("8.33"))  # fmt: skip
    assert not lines["unpriced"].priced and lines["unpriced"].total == Decimal("0.00")
    assert lines["tiny"].priced
    assert (sales.token_cost, sales.gpu_cost, sales.total) == (Decimal("0.50"), Decimal("8.33"), Decimal("8.83"))
    assert legal.gpu_cost + sales.gpu_cost == Decimal("25.00")
    assert report.total == Decimal("27.00")
    assert [(u.model, u.gpu_hours, u.gpu_cost) for u in report.unallocated] == [("big", Decimal("3.000"),
                                                                                 Decimal("12.00"))]  # fmt: skip


def test_department_admin_sees_their_share_computed_over_everyone(march: dict) -> None:
    report = reports.chargeback(march["dora"], date(2025, 3, 1))
    (legal,) = report.departments
    assert legal.department == march["legal"] and legal.gpu_cost == Decimal("16.67")
    assert report.unallocated == []
    response = march["dora_client"].get(reverse("tenancy:chargeback"), {"month": "2025-03"})
    page = response.content.decode()
    assert response.status_code == 200 and "Legal" in page and "Sales" not in page and "18.17" in page
    lines = _csv(march["dora_client"].get(reverse("tenancy:chargeback-csv"), {"month": "2025-03"}))
    assert [row[2] for row in lines[1:]] == ["Legal"]


def test_gpu_cost_shares_always_add_up() -> None:
    shares = reports.split_cents(Decimal("0.10"), {3: 1, 1: 1, 2: 1})
    assert shares == {1: Decimal("0.04"), 2: Decimal("0.03"), 3: Decimal("0.03")}
    assert sum(reports.split_cents(Decimal("100.00"), {1: 7, 2: 11, 3: 13}).values()) == Decimal("100.00")
    assert reports.split_cents(Decimal("5.00"), {1: 0}) == {1: Decimal("0.00")}


def test_chargeback_page_and_csv(admin_client: Client, march: dict) -> None:
    response = admin_client.get(reverse("tenancy:chargeback"), {"month": "2025-03"})
    assert response.status_code == 200
    page = response.content.decode()
    for figure in ("18.17", "8.83", "16.67", "27.00", "12.00", "no price"):
        assert figure in page
    assert 'action="/departments/chargeback/prices"' in page

    csv_response = admin_client.get(reverse("tenancy:chargeback-csv"), {"month": "2025-03"})
    assert csv_response["Content-Disposition"] == 'attachment; filename="chargeback-2025-03.csv"'
    lines = _csv(csv_response)
    assert lines[0] == reports.CHARGEBACK_CSV_HEADER
    rows = [dict(zip(lines[0], line, strict=True)) for line in lines[1:]]
    by = {(r["department"], r["model"]): r for r in rows}
    assert (by[("Legal", "tiny")]["token_cost"], by[("Legal", "tiny")]["gpu_cost"], by[("Legal", "tiny")]["total"]) == (
        "1.50", "16.67", "18.17")  # fmt: skip
    assert by[("Sales", "tiny")]["total"] == "8.83" and by[("Sales", "unpriced")]["total"] == "0.00"
    assert by[("", "big")]["gpu_cost"] == "12.00"

    default = admin_client.get(reverse("tenancy:chargeback"))
    assert default.status_code == 200 and default.context["month"] == f"{datetime.now(UTC):%Y-%m}"


@pytest.mark.parametrize("month", ["2025-13", "2025-3", "march", "2025-03-01", "1999-12", "0000-01", "2025-00"])
@pytest.mark.parametrize("name", ["tenancy:chargeback", "tenancy:chargeback-csv"])
def test_bad_month_gets_a_form_error(admin_client: Client, name: str, month: str) -> None:
    response = admin_client.get(reverse(name), {"month": month})
    assert response.status_code == (400 if name.endswith("csv") else 200) and not response.streaming
    assert "YYYY-MM" in " ".join(response.context["form"].errors["month"])
    assert "report" not in response.context


# Prices


def _price(**overrides: str) -> dict[str, str]:
    return {"model": "tiny", "prompt_per_million": "0.5", "completion_per_million": "1.5", "gpu_hour": "2.5",
            "month": "2025-03"} | overrides  # fmt: skip


def test_admin_sets_prices_and_every_change_is_audited(admin_client: Client, deployment_factory: Any) -> None:
    deployment_factory(name="tiny")
    response = admin_client.post(reverse("tenancy:set-price"), _price())
    assert response.status_code == 302 and response["Location"] == reverse("tenancy:chargeback") + "?month=2025-03"
    price = ModelPrice.objects.get(model="tiny")
    assert (price.prompt_per_million, price.completion_per_million, price.gpu_hour) == (
        Decimal("0.5"), Decimal("1.5"), Decimal("2.5"))  # fmt: skip
    admin_client.post(reverse("tenancy:set-price"), _price(gpu_hour="3", month=""))
    price.refresh_from_db()
    assert price.gpu_hour == Decimal("3") and ModelPrice.objects.count() == 1
    first, second = AuditEvent.objects.filter(action="model_price.set").order_by("pk")
    assert first.detail["before"] is None and first.detail["gpu_hour"] == "2.5000"
    assert second.detail["before"]["gpu_hour"] == "2.5000" and second.detail["gpu_hour"] == "3.0000"
    assert second.target_repr == "tiny"


def test_admin_removes_a_price_after_confirming_and_it_is_audited(admin_client: Client, admin_user: Any,
                                                                   deployment_factory: Any) -> None:  # fmt: skip
    deployment_factory(name="tiny")
    admin_client.post(reverse("tenancy:set-price"), _price())
    price = ModelPrice.objects.get(model="tiny")
    page = admin_client.get(reverse("tenancy:chargeback"), {"month": "2025-03"}).content.decode()
    assert 'data-confirm="Remove the prices of “tiny”?' in page
    response = admin_client.post(reverse("tenancy:delete-price", args=[price.pk]), {"month": "2025-03"}, follow=True)
    assert response.redirect_chain[-1][0] == reverse("tenancy:chargeback") + "?month=2025-03"
    assert "Prices of tiny removed: it costs nothing in chargeback now." in response.content.decode()
    assert not ModelPrice.objects.exists()
    event = AuditEvent.objects.get(action="model_price.delete")
    assert event.actor == admin_user and event.detail["gpu_hour"] == "2.5000" and event.target_repr == "tiny"
    # Gone already (a second tab): 404, nothing else removed; a month that is not one is not echoed back.
    assert admin_client.post(reverse("tenancy:delete-price", args=[price.pk])).status_code == 404
    response = admin_client.post(reverse("tenancy:delete-price", args=[999]), {"month": "x//evil"})
    assert response.status_code == 404


def test_the_api_removes_a_price(admin_user: Any, deployment_factory: Any, client: Client) -> None:
    from appliance.models import ApiToken

    deployment_factory(name="tiny")
    price = ModelPrice.objects.create(model="tiny", prompt_per_million=1)
    _token, raw = ApiToken.issue(admin_user, "t")
    headers = {"HTTP_AUTHORIZATION": f"Bearer {raw}"}
    assert client.delete(f"/api/v1/prices/{price.pk}", **headers).status_code == 204
    assert client.delete(f"/api/v1/prices/{price.pk}", **headers).status_code == 404
    assert AuditEvent.objects.get(action="model_price.delete").detail["via"] == "api"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prompt_per_million": "-0.01"}, "prompt_per_million"),
        ({"completion_per_million": "1000000.01"}, "completion_per_million"),
        ({"gpu_hour": "1e9"}, "gpu_hour"),
        ({"gpu_hour": "NaN"}, "gpu_hour"),
        ({"gpu_hour": "abc"}, "gpu_hour"),
        ({"model": ""}, "model"),
        ({"model": "no-such-model"}, "model"),
    ],
)
def test_bad_prices_are_refused_with_a_field_error(
    admin_client: Client, deployment_factory: Any, overrides: dict, field: str
) -> None:
    deployment_factory(name="tiny")
    response = admin_client.post(reverse("tenancy:set-price"), _price(**overrides))
    assert response.status_code == 400 and list(response.context["price_form"].errors) == [field]
    assert not ModelPrice.objects.exists() and not AuditEvent.objects.filter(action="model_price.set").exists()


def test_only_appliance_admins_set_prices(viewer_client: Client, world: dict) -> None:
    assert viewer_client.post(reverse("tenancy:set-price"), _price()).status_code == 403
    assert world["dora_client"].post(reverse("tenancy:set-price"), _price()).status_code == 403
    assert not ModelPrice.objects.exists()
    assert AuditEvent.objects.filter(outcome="denied").count() == 2
    page = world["dora_client"].get(reverse("tenancy:chargeback")).content.decode()
    assert reverse("tenancy:set-price") not in page


def test_a_month_of_entries_gives_one_bar_per_day(redis_db: redis.Redis, world: dict) -> None:
    """One entry a day for a month: the daily chart has one bar per day, the hourly rows stay out of it."""
    start = _at(2025, 3, 1, 12).timestamp()
    for day in range(31):
        usage.publish(redis_db, usage.entry(department_id=world["legal"].pk, key_id=world["legal_key"].pk,
                                            deployment_id=None, model="tiny", endpoint="chat/completions",
                                            prompt_tokens=day, at=start + day * 86400))  # fmt: skip
    assert usage.drain(redis_db) == 31
    span = reports.Range(date(2025, 3, 1), date(2025, 3, 31))
    chart = reports.series(reports.scoped_rollups(world["admin"], span), "department", span)
    assert chart["tokens"] == [{"label": "Legal", "data": list(range(31))}]
