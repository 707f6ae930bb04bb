"""Usage reports and chargeback, read from the roll-ups (never from the raw records).

Every query starts from ``scoped_rollups(user, …)``, which goes through ``Department.objects.visible_to``:
a department admin gets their own departments' rows and nothing else, whatever ids a filter names.
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
from typing import Any

from django.db.models import QuerySet, Sum
from django.utils import timezone
from django.utils.translation import gettext as _

from appliance.roles import department_ids
from tenancy.models import ApiKey, Department, DeploymentHours, ModelPrice, UsageRollup

MAX_DAYS = 400
HOURLY_UP_TO_DAYS = 2
DEFAULT_DAYS = 7
GROUPS = ("department", "key", "model")
CHART_SERIES = 8  # more groups than this are summed into "Other" on charts
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
    ``departments`` when given (ids the user may not see simply match nothing)."""
    visible = Department.objects.visible_to(user)
    if departments is not None:
        visible = visible.filter(pk__in=list(departments))
    return UsageRollup.objects.filter(
        period=span.period, start__gte=span.since, start__lt=span.until, department__in=visible
    ).order_by()


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


def breakdown(rows: QuerySet[UsageRollup], group: str) -> list[Totals]:
    """One ``Totals`` per department, key or model, most tokens first."""
    if group not in GROUPS:
        raise ValueError(f"Unknown grouping {group!r}.")
    name = _GROUP_FIELD[group]
    grouped = list(rows.values(name).annotate(**_SUMS))
    labels = _labels(group, (g[name] for g in grouped))
    out = [_totals(labels.get(g[name], str(g[name])), g) for g in grouped]
    return sorted(out, key=lambda t: (-t.tokens, t.label))


def series(rows: QuerySet[UsageRollup], group: str, span: Range) -> dict[str, Any]:
    """Chart data: bucket labels, tokens per bucket stacked by group (the largest ``CHART_SERIES``
    groups, the rest as "Other"), and requests and errors per bucket."""
    if group not in GROUPS:
        raise ValueError(f"Unknown grouping {group!r}.")
    name = _GROUP_FIELD[group]
    buckets = span.buckets()
    index = {moment: i for i, moment in enumerate(buckets)}
    grouped = list(rows.values("start", name).annotate(**_SUMS))
    per_group: dict[Any, int] = defaultdict(int)
    for g in grouped:
        per_group[g[name]] += (g["prompt_tokens"] or 0) + (g["completion_tokens"] or 0)
    labels = _labels(group, per_group)
    ranked = sorted(per_group, key=lambda v: (-per_group[v], labels.get(v, str(v))))
    shown = ranked[:CHART_SERIES] if len(ranked) <= CHART_SERIES else ranked[: CHART_SERIES - 1]
    other = _("Other")
    tokens: dict[str, list[int]] = {labels.get(v, str(v)): [0] * len(buckets) for v in shown}
    requests, errors = [0] * len(buckets), [0] * len(buckets)
    for g in grouped:
        i = index.get(g["start"].astimezone(UTC))
        if i is None:
            continue
        label = labels.get(g[name], str(g[name])) if g[name] in shown else other
        tokens.setdefault(label, [0] * len(buckets))[i] += (g["prompt_tokens"] or 0) + (g["completion_tokens"] or 0)
        requests[i] += g["requests"] or 0
        errors[i] += g["errors"] or 0
    return {
        "labels": [span.label(moment) for moment in buckets],
        "tokens": [{"label": label, "data": data} for label, data in tokens.items()],
        "requests": [{"label": _("Requests"), "data": requests}, {"label": _("Errors"), "data": errors}],
        "axis": {"tokens": _("Tokens"), "requests": _("Requests")},
    }


def _cell(value: Any) -> Any:
    """A spreadsheet would run a text cell starting with one of these as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class _Echo:
    def write(self, value: str) -> str:
        return value


USAGE_CSV_HEADER = [
    "period", "start", "department_id", "department", "api_key_id", "api_key", "model", "requests", "errors",
    "prompt_tokens", "completion_tokens", "total_tokens", "latency_ms_sum", "ttft_ms_sum", "ttft_count",
]  # fmt: skip


def usage_csv(rows: QuerySet[UsageRollup]) -> Iterator[str]:
    """CSV lines: a header, then one line per roll-up row (oldest first)."""
    writer = csv.writer(_Echo())
    yield writer.writerow(USAGE_CSV_HEADER)
    rows = rows.select_related("department", "api_key").order_by("start", "department__name", "api_key_id", "model")
    for r in rows.iterator(chunk_size=2000):
        line = [r.period, r.start.astimezone(UTC).isoformat(), r.department_id, _cell(r.department.name),
                r.api_key_id, _cell(str(r.api_key)), _cell(r.model), r.requests, r.errors, r.prompt_tokens,
                r.completion_tokens, r.prompt_tokens + r.completion_tokens, round(r.latency_ms_sum, 3),
                round(r.ttft_ms_sum, 3), r.ttft_count]  # fmt: skip
        yield writer.writerow(line)


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
    "gpu_hours", "gpu_cost", "total",
]  # fmt: skip


def chargeback_csv(report: Chargeback) -> Iterator[str]:
    """CSV lines: a header, one line per department and model, then GPU time no department used."""
    writer = csv.writer(_Echo())
    month = f"{report.month:%Y-%m}"
    yield writer.writerow(CHARGEBACK_CSV_HEADER)
    for charge in report.departments:
        for line in charge.lines:
            row = [month, charge.department.pk, _cell(charge.department.name), _cell(line.model), line.prompt_tokens,
                   line.completion_tokens, line.token_cost, line.gpu_hours, line.gpu_cost, line.total]  # fmt: skip
            yield writer.writerow(row)
    for item in report.unallocated:
        yield writer.writerow([month, "", "", _cell(item.model), 0, 0, "0.00", item.gpu_hours, item.gpu_cost,
                               item.gpu_cost])  # fmt: skip
