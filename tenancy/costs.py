"""The cost view: what each deployment's GPU time bought in a month, for whoever pays for the box.

Per deployment: GPU-hours held (the hours its replicas held GPUs, ``DeploymentHours``), the share of
that time its engines were busy (engine samples with a request running: ``provisioning.EngineSample``,
minute resolution), tokens served, tokens per GPU-hour, what it cost at the chargeback prices (tokens
and GPU time, ``reports.chargeback``), cost per million tokens, prompt tokens served from the prefix
cache (the engines' hit rate times the prompt tokens) and what they would have cost, and whether it
sat idle: running with no tokens for ``IDLE_DAYS`` days, with a suggestion to scale it down. Per
department: tokens, cost and cost per million tokens of the month. CPU-only deployments hold no
GPU-hours: their figures are per replica-hour instead."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Avg, Count, Max, Q, Sum
from django.utils import timezone

from tenancy import reports
from tenancy.models import DeploymentHours, ModelPrice, UsageRollup

IDLE_DAYS = 7
MILLION = Decimal(1_000_000)


def per_million(cost: Decimal, tokens: int) -> Decimal | None:
    """Cost of a million tokens at this cost for these tokens (None: no tokens, or nothing priced)."""
    return reports.cents(cost * MILLION / tokens) if tokens and cost else None


@dataclass
class DeploymentCost:
    name: str
    gpu_hours: float  # held
    replica_hours: float
    busy_share: float | None  # of the engines' sampled time, with a request running
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    cached_prompt_tokens: int
    cached_saving: Decimal
    idle_days: int | None  # running with no tokens for this many days (None: not idle)
    running: bool

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def hours(self) -> float:
        """GPU-hours, or replica-hours for a CPU-only deployment."""
        return self.gpu_hours or self.replica_hours

    @property
    def busy_hours(self) -> float | None:
        return None if self.busy_share is None else self.hours * self.busy_share

    @property
    def tokens_per_hour(self) -> float | None:
        return self.tokens / self.hours if self.hours else None

    @property
    def per_million(self) -> Decimal | None:
        return per_million(self.cost, self.tokens)


@dataclass
class DepartmentCost:
    name: str
    tokens: int
    cost: Decimal

    @property
    def per_million(self) -> Decimal | None:
        return per_million(self.cost, self.tokens)


@dataclass
class CostView:
    month: date
    deployments: list[DeploymentCost]
    departments: list[DepartmentCost]

    @property
    def total(self) -> Decimal:
        return sum((d.cost for d in self.deployments), Decimal("0.00"))


def _month_bounds(first: date) -> tuple[datetime, datetime]:
    return (datetime.combine(first, time.min, UTC), datetime.combine(reports.next_month(first), time.min, UTC))


def cost_view(user: Any, month: date) -> CostView:
    """The month's costs of the deployments and departments ``user`` may see."""
    from provisioning.models import Deployment, EngineSample

    first = month.replace(day=1)
    since, until = _month_bounds(first)
    charges = reports.chargeback(user, first)
    cost_by_model: dict[str, Decimal] = {}
    for charge in charges.departments:
        for line in charge.lines:
            cost_by_model[line.model] = cost_by_model.get(line.model, Decimal("0.00")) + line.total
    for unused in charges.unallocated:
        cost_by_model[unused.model] = cost_by_model.get(unused.model, Decimal("0.00")) + unused.gpu_cost
    held = {
        row["deployment_id"]: row
        for row in DeploymentHours.objects.filter(start__gte=since, start__lt=until)
        .values("deployment_id")
        .annotate(gpu=Sum("gpu_seconds"), replica=Sum("replica_seconds"))
        .order_by()
    }
    month_rows = UsageRollup.objects.filter(period=UsageRollup.Period.DAY, start__gte=since, start__lt=until)
    tokens = {
        row["model"]: row
        for row in reports.scoped_usage(month_rows, user)
        .values("model")
        .annotate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
        .order_by()
    }
    samples = {
        row["deployment_id"]: row
        for row in EngineSample.objects.filter(resolution="minute", time__gte=since, time__lt=until)
        .values("deployment_id")
        .annotate(total=Count("pk"), busy=Count("pk", filter=Q(running__gt=0)), hit=Avg("prefix_hit_rate"))
        .order_by()
    }
    prices = {p.model: p for p in ModelPrice.objects.all()}
    last_used = dict(
        UsageRollup.objects.filter(period=UsageRollup.Period.DAY).values("model").annotate(last=Max("start"))
        .order_by().values_list("model", "last")
    )  # fmt: skip
    now = timezone.now()
    rows = []
    for deployment in Deployment.all_objects.visible_to(user).order_by("name"):
        hours, used, sampled = held.get(deployment.pk, {}), tokens.get(deployment.name, {}), samples.get(deployment.pk)
        if not hours and not used and deployment.archived_at is not None:
            continue  # deleted before the month, nothing to show
        prompt = used.get("prompt") or 0
        cached = int(prompt * (sampled["hit"] or 0)) if sampled else 0
        price = prices.get(deployment.name)
        saving = reports.cents(cached * price.prompt_per_million / MILLION) if price else Decimal("0.00")
        running = deployment.archived_at is None and deployment.desired == Deployment.Desired.RUNNING
        quiet_since = last_used.get(deployment.name) or deployment.created_at
        idle = (now - quiet_since).days if running and now - quiet_since >= timedelta(days=IDLE_DAYS) else None
        rows.append(DeploymentCost(
            name=deployment.name, gpu_hours=(hours.get("gpu") or 0) / 3600, replica_hours=(hours.get("replica") or 0)
            / 3600, busy_share=sampled["busy"] / sampled["total"] if sampled and sampled["total"] else None,
            prompt_tokens=prompt, completion_tokens=used.get("completion") or 0,
            cost=cost_by_model.get(deployment.name, Decimal("0.00")), cached_prompt_tokens=cached,
            cached_saving=saving, idle_days=idle, running=running,
        ))  # fmt: skip
    departments = [DepartmentCost(c.department.name, c.tokens, c.total) for c in charges.departments]
    return CostView(first, rows, departments)


CSV_HEADER = [
    "month", "deployment", "gpu_hours", "replica_hours", "busy_share", "prompt_tokens", "completion_tokens",
    "tokens_per_hour", "cost", "cost_per_million_tokens", "cached_prompt_tokens", "cached_saving", "idle_days",
    "currency",
]  # fmt: skip


def cost_csv(view: CostView) -> Iterator[str]:
    writer = csv.writer(reports.Echo())
    yield writer.writerow(CSV_HEADER)
    for row in view.deployments:
        yield writer.writerow([
            f"{view.month:%Y-%m}", reports.csv_cell(row.name), f"{row.gpu_hours:.3f}", f"{row.replica_hours:.3f}",
            "" if row.busy_share is None else f"{row.busy_share:.3f}", row.prompt_tokens, row.completion_tokens,
            "" if row.tokens_per_hour is None else f"{row.tokens_per_hour:.1f}", row.cost,
            row.per_million if row.per_million is not None else "", row.cached_prompt_tokens, row.cached_saving,
            row.idle_days if row.idle_days is not None else "", settings.CURRENCY,
        ])  # fmt: skip
