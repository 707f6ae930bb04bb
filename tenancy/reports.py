"""Usage reports and chargeback, read from the roll-ups (never from the raw records).

Every query starts from ``scoped_rollups(user, …)``, which scopes by ``appliance.roles.department_ids``
as ``Department.objects.visible_to`` does: a department admin gets their own departments' rows and
nothing else, whatever ids a filter names.
Days are UTC days, as the roll-ups are. A range of up to two days reads the hourly rows, a longer one
the daily rows.

Chargeback for a month: tokens × ``ModelPrice``, plus the GPU-hours each deployment held that month ×
its model's GPU-hour price, shared among departments in proportion to their tokens on that model
(a deployment's ``name`` is the served model name the roll-ups carry). Money is ``Decimal``, rounded
to the cent per line; a deployment's GPU cost is split by largest remainder so the shares add up to it.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from itertools import islice
from typing import Any

from django.conf import settings
from django.db.models import Case, F, QuerySet, Sum, When
from django.utils import timezone
from django.utils.translation import gettext as _

from appliance.roles import department_ids
from tenancy.models import ApiKey, Department, DeploymentHours, ModelPrice, UsageRollup

MAX_DAYS = 400
HOURLY_UP_TO_DAYS = 2
DEFAULT_DAYS = 7
GROUPS = ("department", "key", "model")
CHART_SERIES = 8  # more groups than this are summed into "Other" on charts
BREAKDOWN_ROWS = 250  # a longer breakdown table shows the largest groups and "Other" (the CSV has every row)
CENT = Decimal("0.01")
MILLION = Decimal(1_000_000)
MAX_PRICE = Decimal(1_000_000)
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2999, 12, 31)
_GROUP_FIELD = {"department": "department_id", "key": "api_key_id", "model": "model"}


def today() -> date:
    """Today as a UTC day (the roll-ups' days)."""
    return timezone.now().astimezone(UTC).date()


@dataclass(frozen=True)
class Range:
    """Whole UTC days from ``first`` to ``last``, both included."""

    first: date
    last: date

    @classmethod
    def last_days(cls, days: int, until: date | None = None) -> Range:
        last = until or today()
        return cls(last - timedelta(days=days - 1), last)

    def __post_init__(self) -> None:
        if self.last < self.first:
            raise ValueError("The range ends before it starts.")
        if self.days > MAX_DAYS:
            raise ValueError(f"A range covers at most {MAX_DAYS} days.")

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    @property
    def period(self) -> str:
        return UsageRollup.Period.HOUR if self.days <= HOURLY_UP_TO_DAYS else UsageRollup.Period.DAY

    @property
    def since(self) -> datetime:
        return datetime.combine(self.first, time.min, UTC)

    @property
    def until(self) -> datetime:
        """The first moment after the range."""
        return datetime.combine(self.last, time.min, UTC) + timedelta(days=1)

    def buckets(self) -> list[datetime]:
        step = timedelta(hours=1) if self.period == UsageRollup.Period.HOUR else timedelta(days=1)
        moment, out = self.since, []
        while moment < self.until:
            out.append(moment)
            moment += step
        return out

    def label(self, moment: datetime) -> str:
        return f"{moment:%m-%d %H:00}" if self.period == UsageRollup.Period.HOUR else f"{moment:%Y-%m-%d}"


def visible_department_ids(user: Any) -> set[int]:
    return set(Department.objects.visible_to(user).values_list("pk", flat=True))


def scoped_rollups(user: Any, span: Range, departments: Iterable[int] | None = None) -> QuerySet[UsageRollup]:
    """The roll-up rows of ``span`` (at its period) of the departments ``user`` may see, narrowed to
    ``departments`` when given (ids the user may not see simply match nothing).

    Scoped by ``department_ids`` as ``visible_to`` is. Someone who sees every department and names
    none gets no department condition at all: the database then reads one (period, start) index
    range instead of probing the range once per department (three times faster over a month)."""
    rows = UsageRollup.objects.filter(period=span.period, start__gte=span.since, start__lt=span.until).order_by()
    return scoped_usage(rows, user, departments)


def scoped_usage(
    rows: QuerySet[UsageRollup], user: Any, departments: Iterable[int] | None = None
) -> QuerySet[UsageRollup]:
    """``rows`` of the departments ``user`` may see (no condition for who sees them all), narrowed to
    ``departments`` when given."""
    visible = department_ids(user)
    if visible is not None:
        rows = rows.filter(department_id__in=sorted(visible))
    if departments is not None:
        rows = rows.filter(department_id__in=sorted(set(departments)))
    return rows


def tokens_by_model(user: Any, hours: int = 24) -> dict[str, int]:
    """Tokens (prompt and completion) per served model name over the last ``hours`` whole and current
    hours, of the departments ``user`` may see: the deployment list's traffic column."""
    since = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
    rows = scoped_usage(UsageRollup.objects.filter(period=UsageRollup.Period.HOUR, start__gte=since).order_by(), user)
    summed = rows.values("model").annotate(tokens=Sum(F("prompt_tokens") + F("completion_tokens")))
    return {row["model"]: row["tokens"] or 0 for row in summed}


@dataclass
class Totals:
    """Sums over some roll-up rows, with the averages a table shows."""

    label: str = ""
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms_sum: float = 0.0
    ttft_ms_sum: float = 0.0
    ttft_count: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def error_rate(self) -> float:
        return 100.0 * self.errors / self.requests if self.requests else 0.0

    @property
    def avg_latency_ms(self) -> float | None:
        return self.latency_ms_sum / self.requests if self.requests else None

    @property
    def avg_ttft_ms(self) -> float | None:
        return self.ttft_ms_sum / self.ttft_count if self.ttft_count else None


_SUMS = {
    "requests": Sum("requests"),
    "errors": Sum("errors"),
    "prompt_tokens": Sum("prompt_tokens"),
    "completion_tokens": Sum("completion_tokens"),
    "latency_ms_sum": Sum("latency_ms_sum"),
    "ttft_ms_sum": Sum("ttft_ms_sum"),
    "ttft_count": Sum("ttft_count"),
}


def _totals(label: str, values: dict[str, Any]) -> Totals:
    return Totals(label, **{name: values.get(name) or 0 for name in _SUMS})


def totals(rows: QuerySet[UsageRollup]) -> Totals:
    """All of ``rows`` summed."""
    return _totals(_("Total"), rows.aggregate(**_SUMS))


def _labels(group: str, values: Iterable[Any]) -> dict[Any, str]:
    values = [v for v in values if v is not None]
    if group == "department":
        return dict(Department.objects.filter(pk__in=values).values_list("pk", "name"))
    if group == "key":
        keys = ApiKey.objects.filter(pk__in=values).select_related("department")
        return {key.pk: f"{key.department.name} · {key}" for key in keys}
    return {v: v for v in values}


def _grouped(rows: QuerySet[UsageRollup], group: str) -> tuple[str, list[dict[str, Any]]]:
    if group not in GROUPS:
        raise ValueError(f"Unknown grouping {group!r}.")
    name = _GROUP_FIELD[group]
    return name, list(rows.values(name).annotate(**_SUMS).order_by())


def _tokens(values: dict[str, Any]) -> int:
    return (values["prompt_tokens"] or 0) + (values["completion_tokens"] or 0)


def _ranked(group: str, name: str, grouped: list[dict[str, Any]], keep: int) -> tuple[list[dict], dict[Any, str]]:
    """``grouped`` most tokens first, ties by label, and the labels of (at least) the first ``keep``:
    only those are looked up, as a month by key can have thousands of keys."""
    ranked = sorted(grouped, key=lambda g: -_tokens(g))
    if len(ranked) > keep:
        floor = _tokens(ranked[keep - 1])
        head = [g for g in ranked if _tokens(g) >= floor]  # a tie at the cut is ranked by label too
    else:
        head = ranked
    labels = _labels(group, (g[name] for g in head))
    head.sort(key=lambda g: (-_tokens(g), labels.get(g[name], str(g[name]))))
    return head + ranked[len(head) :], labels


def _summed(label: str, grouped: list[dict[str, Any]]) -> Totals:
    return _totals(label, {field: sum(g[field] or 0 for g in grouped) for field in _SUMS})


def _breakdown(name: str, ranked: list[dict], labels: dict[Any, str], limit: int | None) -> list[Totals]:
    shown = ranked if limit is None or len(ranked) <= limit else ranked[: limit - 1]
    out = [_totals(labels.get(g[name], str(g[name])), g) for g in shown]
    if len(shown) < len(ranked):
        out.append(_summed(_("Other"), ranked[len(shown) :]))
    return out


def breakdown(rows: QuerySet[UsageRollup], group: str, limit: int | None = None) -> list[Totals]:
    """One ``Totals`` per department, key or model, most tokens first; with ``limit``, at most that
    many rows, the last one "Other" summing the groups that did not fit."""
    name, grouped = _grouped(rows, group)
    ranked, labels = _ranked(group, name, grouped, len(grouped) if limit is None else limit)
    return _breakdown(name, ranked, labels, limit)


def _chart(rows: QuerySet[UsageRollup], name: str, span: Range, ranked: list[dict], labels: dict) -> dict[str, Any]:
    buckets = span.buckets()
    index = {moment: i for i, moment in enumerate(buckets)}
    shown = [g[name] for g in (ranked[:CHART_SERIES] if len(ranked) <= CHART_SERIES else ranked[: CHART_SERIES - 1])]
    other = _("Other")
    tokens: dict[str, list[int]] = {labels.get(v, str(v)): [0] * len(buckets) for v in shown}
    requests, errors = [0] * len(buckets), [0] * len(buckets)
    # One row per bucket and shown group, plus one per bucket for all the others together (NULL):
    # a few hundred rows, where grouping by bucket and group would return one per key and day.
    member = Case(When(**{f"{name}__in": shown}, then=F(name)), default=None)
    per_bucket = (
        rows.annotate(shown_group=member).values("start", "shown_group").annotate(**_SUMS).order_by() if shown else []
    )
    for g in per_bucket:
        i = index.get(g["start"].astimezone(UTC))
        if i is None:
            continue
        value = g["shown_group"]
        label = other if value is None else labels.get(value, str(value))
        tokens.setdefault(label, [0] * len(buckets))[i] += _tokens(g)
        requests[i] += g["requests"] or 0
        errors[i] += g["errors"] or 0
    return {
        "labels": [span.label(moment) for moment in buckets],
        # The same buckets for the browser, which writes them in the page's language: epoch ms, and
        # whether they are hours (written in the appliance's time zone) or UTC days.
        "moments": [int(moment.timestamp() * 1000) for moment in buckets],
        "period": span.period,
        "time_zone": settings.TIME_ZONE,
        "tokens": [{"label": label, "data": data} for label, data in tokens.items()],
        "requests": [{"label": _("Requests"), "data": requests}, {"label": _("Errors"), "data": errors}],
        "axis": {"tokens": _("Tokens"), "requests": _("Requests")},
    }


def series(rows: QuerySet[UsageRollup], group: str, span: Range) -> dict[str, Any]:
    """Chart data: bucket labels, tokens per bucket stacked by group (the largest ``CHART_SERIES``
    groups, the rest as "Other"), and requests and errors per bucket."""
    name, grouped = _grouped(rows, group)
    ranked, labels = _ranked(group, name, grouped, CHART_SERIES)
    return _chart(rows, name, span, ranked, labels)


@dataclass
class Report:
    totals: Totals
    breakdown: list[Totals]
    chart: dict[str, Any]


def report(rows: QuerySet[UsageRollup], group: str, span: Range, limit: int | None = None) -> Report:
    """What a usage page shows, from two queries over ``rows``: the totals and the breakdown (``limit``
    as in ``breakdown``) from one grouped by ``group``, the chart from one grouped by bucket. The same
    figures as ``totals``, ``breakdown`` and ``series``, which read the rows three times."""
    name, grouped = _grouped(rows, group)
    ranked, labels = _ranked(group, name, grouped, max(limit or len(grouped), CHART_SERIES))
    return Report(_summed(_("Total"), grouped), _breakdown(name, ranked, labels, limit),
                  _chart(rows, name, span, ranked, labels))  # fmt: skip


def csv_cell(value: Any) -> Any:
    """A spreadsheet would run a text cell starting with one of these as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class Echo:
    def write(self, value: str) -> str:
        return value


USAGE_CSV_HEADER = [
    "period", "start", "department_id", "department", "api_key_id", "api_key", "model", "requests", "errors",
    "prompt_tokens", "completion_tokens", "total_tokens", "latency_ms_sum", "ttft_ms_sum", "ttft_count",
]  # fmt: skip


_CSV_FIELDS = ("period", "start", "department_id", "department__name", "api_key_id", "model", "requests", "errors",
               "prompt_tokens", "completion_tokens", "latency_ms_sum", "ttft_ms_sum", "ttft_count")  # fmt: skip


def usage_csv(rows: QuerySet[UsageRollup], span: Range | None = None) -> Iterator[str]:
    """CSV lines: a header, then one line per roll-up row (oldest first). Given the ``span`` of the
    rows, they are read a day at a time, so the first lines go out without sorting the whole range."""
    writer = csv.writer(Echo())
    yield writer.writerow(USAGE_CSV_HEADER)
    ordered = rows.order_by("start", "department__name", "api_key_id", "model").values_list(*_CSV_FIELDS)
    parts: Iterable[QuerySet] = [ordered]
    if span is not None:
        days = [span.since + timedelta(days=n) for n in range(span.days)]
        parts = (ordered.filter(start__gte=day, start__lt=day + timedelta(days=1)) for day in days)
    key_labels: dict[int, str] = {}
    for part in parts:
        lines = part.iterator(chunk_size=2000)
        while batch := list(islice(lines, 2000)):
            missing = {row[4] for row in batch} - key_labels.keys()
            if missing:
                key_labels.update((k.pk, str(k)) for k in ApiKey.objects.filter(pk__in=missing).only("name", "key_id"))
            for (period, start, department_id, department, key_id, model, requests, errors, prompt, completion,
                 latency, ttft, ttft_count) in batch:  # fmt: skip
                yield writer.writerow([period, start.astimezone(UTC).isoformat(), department_id, csv_cell(department),
                                       key_id, csv_cell(key_labels[key_id]), csv_cell(model), requests, errors, prompt,
                                       completion, prompt + completion, round(latency, 3), round(ttft, 3),
                                       ttft_count])  # fmt: skip


# Chargeback


def parse_month(value: str) -> date:
    """``YYYY-MM`` → the month's first day; ValueError for anything else."""
    try:
        parsed = datetime.strptime(value, "%Y-%m").date()
    except (TypeError, ValueError):
        raise ValueError("Not a YYYY-MM month.") from None
    if len(value) != 7 or not FIRST_DAY.year <= parsed.year <= LAST_DAY.year:
        raise ValueError("Not a YYYY-MM month.")
    return parsed


def next_month(first: date) -> date:
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


def cents(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def split_cents(amount: Decimal, weights: dict[int, int]) -> dict[int, Decimal]:
    """``amount`` (whole cents) shared in proportion to ``weights`` by largest remainder: the shares
    add up to ``amount`` exactly; ties go to the lower key."""
    total = sum(weights.values())
    whole = int((amount / CENT).to_integral_value())
    if total <= 0:
        return dict.fromkeys(weights, Decimal("0.00"))
    parts = {k: divmod(whole * w, total) for k, w in weights.items()}
    shares = {k: q for k, (q, _r) in parts.items()}
    left = whole - sum(shares.values())
    for k in sorted(parts, key=lambda k: (-parts[k][1], k))[:left]:
        shares[k] += 1
    return {k: Decimal(v) * CENT for k, v in shares.items()}


@dataclass
class ChargeLine:
    """One department's use of one model in the month."""

    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_cost: Decimal = Decimal("0.00")
    gpu_hours: Decimal = Decimal("0.000")
    gpu_cost: Decimal = Decimal("0.00")
    priced: bool = False

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def total(self) -> Decimal:
        return self.token_cost + self.gpu_cost


@dataclass
class DepartmentCharge:
    department: Department
    lines: list[ChargeLine] = field(default_factory=list)

    def _sum(self, name: str) -> Any:
        return sum((getattr(line, name) for line in self.lines), Decimal(0) if name != "tokens" else 0)

    @property
    def tokens(self) -> int:
        return self._sum("tokens")

    @property
    def token_cost(self) -> Decimal:
        return self._sum("token_cost")

    @property
    def gpu_hours(self) -> Decimal:
        return self._sum("gpu_hours")

    @property
    def gpu_cost(self) -> Decimal:
        return self._sum("gpu_cost")

    @property
    def total(self) -> Decimal:
        return self.token_cost + self.gpu_cost


@dataclass
class Unallocated:
    """GPU time of a model nobody sent tokens to in the month: no department to charge it to."""

    model: str
    gpu_hours: Decimal
    gpu_cost: Decimal


@dataclass
class Chargeback:
    month: date
    departments: list[DepartmentCharge]
    unallocated: list[Unallocated]

    @property
    def total(self) -> Decimal:
        return sum((d.total for d in self.departments), Decimal("0.00"))


def _gpu_hours(first: date, after: date) -> dict[str, Decimal]:
    since, until = (datetime.combine(d, time.min, UTC) for d in (first, after))
    rows = (
        DeploymentHours.objects.filter(start__gte=since, start__lt=until)
        .values("deployment__name")
        .annotate(seconds=Sum("gpu_seconds"))
        .order_by()
    )
    return {r["deployment__name"]: Decimal(repr(r["seconds"] or 0.0)) / 3600 for r in rows}


def chargeback(user: Any, month: date) -> Chargeback:
    """The month's charges of the departments ``user`` may see. GPU shares are computed over every
    department's tokens (a share must not grow because the viewer sees fewer departments)."""
    first = month.replace(day=1)
    after = next_month(first)
    usage = (
        UsageRollup.objects.filter(
            period=UsageRollup.Period.DAY,
            start__gte=datetime.combine(first, time.min, UTC),
            start__lt=datetime.combine(after, time.min, UTC),
        )
        .values("department_id", "model")
        .annotate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
        .order_by()
    )
    prices = {p.model: p for p in ModelPrice.objects.all()}
    hours = _gpu_hours(first, after)
    per_model: dict[str, dict[int, ChargeLine]] = defaultdict(dict)
    for row in usage:
        price = prices.get(row["model"])
        line = ChargeLine(row["model"], row["prompt"] or 0, row["completion"] or 0, priced=price is not None)
        if price is not None:
            line.token_cost = cents(
                line.prompt_tokens * price.prompt_per_million / MILLION
                + line.completion_tokens * price.completion_per_million / MILLION
            )
        per_model[row["model"]][row["department_id"]] = line
    unallocated = []
    for model, gpu_hours in sorted(hours.items()):
        price = prices.get(model)
        gpu_cost = cents(gpu_hours * price.gpu_hour) if price is not None else Decimal("0.00")
        lines = per_model.get(model, {})
        weights = {dept: line.tokens for dept, line in lines.items() if line.tokens}
        if not weights:
            unallocated.append(Unallocated(model, gpu_hours.quantize(Decimal("0.001")), gpu_cost))
            continue
        total_tokens = sum(weights.values())
        for dept, share in split_cents(gpu_cost, weights).items():
            lines[dept].gpu_cost = share
            lines[dept].gpu_hours = (gpu_hours * weights[dept] / total_tokens).quantize(Decimal("0.001"))
    visible = visible_department_ids(user)
    by_department: dict[int, DepartmentCharge] = {}
    departments = {d.pk: d for d in Department.objects.filter(pk__in=visible)}
    for model in sorted(per_model):
        for dept, line in per_model[model].items():
            if dept in departments:
                by_department.setdefault(dept, DepartmentCharge(departments[dept])).lines.append(line)
    charges = sorted(by_department.values(), key=lambda c: c.department.name)
    return Chargeback(first, charges, unallocated if department_ids(user) is None else [])


CHARGEBACK_CSV_HEADER = [
    "month", "department_id", "department", "model", "prompt_tokens", "completion_tokens", "token_cost",
    "gpu_hours", "gpu_cost", "total", "currency",
]  # fmt: skip


def chargeback_csv(report: Chargeback) -> Iterator[str]:
    """CSV lines: a header, one line per department and model, then GPU time no department used."""
    writer = csv.writer(Echo())
    month = f"{report.month:%Y-%m}"
    yield writer.writerow(CHARGEBACK_CSV_HEADER)
    for charge in report.departments:
        for line in charge.lines:
            row = [month, charge.department.pk, csv_cell(charge.department.name), csv_cell(line.model),
                   line.prompt_tokens, line.completion_tokens, line.token_cost, line.gpu_hours, line.gpu_cost,
                   line.total, settings.CURRENCY]  # fmt: skip
            yield writer.writerow(row)
    for item in report.unallocated:
        yield writer.writerow([month, "", "", csv_cell(item.model), 0, 0, "0.00", item.gpu_hours, item.gpu_cost,
                               item.gpu_cost, settings.CURRENCY])  # fmt: skip
