"""Pages with long lists and large reports (issue #8): the departments list and a department's keys
come a page at a time, with the same number of queries however many keys there are; a breakdown
longer than its limit ends with one "Other" row; the two-query report gives the figures of
``totals``/``breakdown``/``series``; the CSV, read a day at a time, keeps its order."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import UTC, date, datetime
from typing import Any

import pytest
from django.core.paginator import Paginator
from django.db import connection
from django.template.loader import render_to_string
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from tenancy import reports, views
from tenancy.models import ApiKey, Department, UsageRollup

pytestmark = pytest.mark.django_db


def _at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def _rollup(period: str, start: datetime, key: ApiKey, model: str = "tiny", **values: Any) -> UsageRollup:
    return UsageRollup.objects.create(
        period=period, start=start, department_id=key.department_id, api_key=key, model=model, **values
    )


def _queries(client: Any, url: str, **params: Any) -> tuple[Any, int]:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url, params)
    assert response.status_code == 200
    return response, len(queries)


def test_departments_list_comes_a_page_at_a_time(admin_client: Any) -> None:
    departments = Department.objects.bulk_create(Department(name=f"d{i:03d}") for i in range(views.PAGE_SIZE + 10))
    first, before = _queries(admin_client, reverse("tenancy:list"))
    page = first.context["departments"]
    assert page.number == 1 and page.paginator.num_pages == 2 and len(page) == views.PAGE_SIZE
    second = admin_client.get(reverse("tenancy:list"), {"page": 2}).context["departments"]
    assert [d.name for d in second] == [f"d{i:03d}" for i in range(views.PAGE_SIZE, views.PAGE_SIZE + 10)]

    for department in departments[:10]:
        for n in range(3):
            ApiKey.issue(department, f"app {n}")
    departments[0].api_keys.first().revoke()
    response, after = _queries(admin_client, reverse("tenancy:list"))
    assert after == before  # the usable keys are counted in the list's own query, not one per department
    counts = [d.usable_keys for d in response.context["departments"]]
    assert counts[:10] == [2] + [3] * 9 and counts[10:] == [0] * (views.PAGE_SIZE - 10)


def test_a_departments_keys_come_a_page_at_a_time(admin_client: Any) -> None:
    legal = Department.objects.create(name="Legal")
    for n in range(views.PAGE_SIZE + 5):
        ApiKey.issue(legal, f"app {n:02d}")
    url = reverse("tenancy:detail", args=[legal.pk])
    first, before = _queries(admin_client, url)
    keys = first.context["keys"]
    assert len(keys) == views.PAGE_SIZE and keys.paginator.count == views.PAGE_SIZE + 5
    assert keys[0].name == f"app {views.PAGE_SIZE + 4:02d}"  # newest first
    second, after = _queries(admin_client, url, page=2)
    assert [k.name for k in second.context["keys"]] == [f"app {n:02d}" for n in range(4, -1, -1)]
    assert after == before


def test_a_breakdown_over_its_limit_ends_with_other(admin_user: Any) -> None:
    legal = Department.objects.create(name="Legal")
    keys = {name: ApiKey.issue(legal, name)[0] for name in ("a", "b", "c", "d", "e")}
    tokens = {"a": 100, "b": 300, "c": 300, "d": 300, "e": 50}  # b, c, d tie
    for name, key in keys.items():
        _rollup("day", _at(2025, 3, 4), key, requests=1, prompt_tokens=tokens[name], latency_ms_sum=10.5)
    span = reports.Range(date(2025, 3, 3), date(2025, 3, 5))
    rows = reports.scoped_rollups(admin_user, span)

    full = reports.breakdown(rows, "key")
    assert [t.label[len("Legal · ") :][:1] for t in full] == ["b", "c", "d", "a", "e"]
    assert reports.breakdown(rows, "key", limit=5) == full

    short = reports.breakdown(rows, "key", limit=3)
    assert [t.label[len("Legal · ") :][:1] for t in short[:2]] == ["b", "c"]  # the tie at the cut goes by label
    other = short[2]
    assert (other.label, other.requests, other.prompt_tokens, other.latency_ms_sum) == ("Other", 3, 450, 31.5)
    assert reports.report(rows, "key", span, limit=3).breakdown == short


def _reference(rows: list[UsageRollup], group: str, span: reports.Range) -> tuple[list[tuple], dict]:
    """What the report should say, summed naively in Python."""
    field = {"department": "department_id", "key": "api_key_id", "model": "model"}[group]
    label = {
        "department": lambda r: r.department.name,
        "key": lambda r: f"{r.department.name} · {r.api_key}",
        "model": lambda r: r.model,
    }[group]
    per_group: dict[Any, list] = {}
    for r in rows:
        sums = per_group.setdefault(getattr(r, field), [label(r), 0, 0, 0])
        sums[1] += r.requests
        sums[2] += r.prompt_tokens + r.completion_tokens
        sums[3] += r.errors
    ranked = sorted(per_group, key=lambda v: (-per_group[v][2], per_group[v][0]))
    shown = ranked if len(ranked) <= reports.CHART_SERIES else ranked[: reports.CHART_SERIES - 1]
    buckets = span.buckets()
    tokens: dict[str, list[int]] = {per_group[v][0]: [0] * len(buckets) for v in shown}
    requests = [0] * len(buckets)
    for r in rows:
        i = buckets.index(r.start.astimezone(UTC))
        value = getattr(r, field)
        name = per_group[value][0] if value in shown else "Other"
        tokens.setdefault(name, [0] * len(buckets))[i] += r.prompt_tokens + r.completion_tokens
        requests[i] += r.requests
    table = [tuple(per_group[v]) for v in ranked]
    return table, {"tokens": [{"label": k, "data": v} for k, v in tokens.items()], "requests": requests}


@pytest.mark.parametrize("group", reports.GROUPS)
def test_the_two_query_report_gives_the_figures_of_the_three_reads(admin_user: Any, group: str) -> None:
    departments = [Department.objects.create(name=name) for name in ("Zeta", "Alpha", "Mu")]
    keys = [ApiKey.issue(departments[n % 3], f"app {n}")[0] for n in range(7)]
    for day in range(3):
        for n, key in enumerate(keys):
            for m in range(day + 2 * (n % 4)):  # up to 9 models, unevenly used
                _rollup("day", _at(2025, 3, 3 + day), key, model=f"m{m}", requests=n + m + 1, errors=m % 2,
                        prompt_tokens=100 * ((n * 7 + m * 3) % 11), completion_tokens=10 * m,
                        latency_ms_sum=12.5 * m, ttft_ms_sum=0.5 * n, ttft_count=n)  # fmt: skip
    span = reports.Range(date(2025, 3, 2), date(2025, 3, 6))
    rows = reports.scoped_rollups(admin_user, span)
    summary = reports.report(rows, group, span)
    assert summary.totals == reports.totals(rows)
    assert summary.breakdown == reports.breakdown(rows, group)
    assert summary.chart == reports.series(rows, group, span)

    table, chart = _reference(list(UsageRollup.objects.select_related("department", "api_key")), group, span)
    assert [(t.label, t.requests, t.tokens, t.errors) for t in summary.breakdown] == table
    assert summary.chart["tokens"] == chart["tokens"]
    assert summary.chart["requests"][0]["data"] == chart["requests"]


def test_usage_page_and_department_page_cut_long_breakdowns(
    admin_client: Any, admin_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    legal = Department.objects.create(name="Legal")
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    for n in range(4):
        _rollup("day", today, ApiKey.issue(legal, f"app {n}")[0], requests=1, prompt_tokens=10 * (n + 1))
    monkeypatch.setattr(reports, "BREAKDOWN_ROWS", 3)
    monkeypatch.setattr(views, "PANEL_KEY_ROWS", 2)
    page = admin_client.get(reverse("tenancy:usage"), {"group": "key"}).context
    assert [t.label[:13] for t in page["breakdown"]] == ["Legal · app 3", "Legal · app 2", "Other"]
    assert page["breakdown"][-1].prompt_tokens == 30 and page["totals"].prompt_tokens == 100
    panel = admin_client.get(reverse("tenancy:detail", args=[legal.pk])).context["usage"]
    assert [t.label[:13] for t in panel["by_key"]] == ["Legal · app 3", "Other"]
    assert panel["totals"].requests == 4 and [t.label for t in panel["by_model"]] == ["tiny"]


def test_csv_read_a_day_at_a_time_keeps_its_order(admin_client: Any) -> None:
    zeta, alpha = Department.objects.create(name="Zeta"), Department.objects.create(name="Alpha")
    z1, a1, a2 = ApiKey.issue(zeta, "z1")[0], ApiKey.issue(alpha, "a1")[0], ApiKey.issue(alpha, "a2")[0]
    expected = []
    for day in (3, 5, 6):  # the 4th has no rows
        start = _at(2025, 3, day)
        for key, model in ((a1, "b"), (a1, "a"), (a2, "a"), (z1, "a")):
            _rollup("day", start, key, model=model, requests=day)
        expected += [(start.isoformat(), "Alpha", a1.pk, "a"), (start.isoformat(), "Alpha", a1.pk, "b"),
                     (start.isoformat(), "Alpha", a2.pk, "a"), (start.isoformat(), "Zeta", z1.pk, "a")]  # fmt: skip
    _rollup("day", _at(2025, 3, 8), a1, requests=1)  # after the range
    response = admin_client.get(reverse("tenancy:usage-csv"), {"start": "2025-03-03", "end": "2025-03-07"})
    lines = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [(r["start"], r["department"], int(r["api_key_id"]), r["model"]) for r in lines] == expected
    assert lines[0]["api_key"] == str(a1) and lines[-1]["api_key"] == str(z1)
    by_day: dict[str, int] = defaultdict(int)
    for r in lines:
        by_day[r["start"][:10]] += int(r["requests"])
    assert dict(by_day) == {"2025-03-03": 12, "2025-03-05": 20, "2025-03-06": 24}


def test_pagination_include_links_the_neighbouring_pages() -> None:
    middle = render_to_string(
        "dashboard/_pagination.html", {"page": Paginator(range(120), 50).get_page(2), "query": "group=key"}
    )
    assert 'href="?group=key&amp;page=1"' in middle and 'href="?group=key&amp;page=3"' in middle
    assert "Page 2 of 3" in middle
    first = render_to_string("dashboard/_pagination.html", {"page": Paginator(range(120), 50).get_page(1)})
    assert 'href="?page=2"' in first and "page=0" not in first
    assert not render_to_string("dashboard/_pagination.html", {"page": Paginator(range(3), 50).get_page(1)}).strip()
