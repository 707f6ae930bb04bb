"""Usage records off the hot path: the gateway appends one entry per request to a Redis stream
(``entry()`` builds it); ``drain()`` moves entries into ``UsageRecord`` rows in batches and adds them
to the hourly/daily roll-ups in the same transaction, then acknowledges them. A drainer that died
mid-batch leaves its entries pending; the next one claims them, and ``stream_id`` keeps a batch
that was already written from being counted twice.

``rebuild_budgets()`` restores the limiter's day/month counters from the roll-ups after Redis lost
its data (a marker key that only a rebuild sets tells that it did). ``account_gpu_hours()`` adds
the GPU time ready replicas held to ``DeploymentHours`` for chargeback."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from django.db import connection, transaction
from django.db.models import F, Sum

STREAM = "usage:stream"
GROUP = "db"
STREAM_MAXLEN = 2_000_000  # about a day of a busy box; trimmed approximately
MARKER = "usage:budgets-rebuilt"
GPU_TICK = "usage:gpu-hours:last"


def entry(
    *,
    department_id: int | None,
    key_id: int | None,
    deployment_id: int | None,
    model: str,
    endpoint: str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    latency_ms: float = 0.0,
    ttft_ms: float | None = None,
    status: int = 200,
    error: str = "",
    client: str = "",
    at: float | None = None,
) -> dict[str, str]:
    """One stream entry (flat strings, as Redis streams store them)."""
    return {
        "t": f"{time.time() if at is None else at:.6f}",
        "d": "" if department_id is None else str(department_id),
        "k": "" if key_id is None else str(key_id),
        "p": "" if deployment_id is None else str(deployment_id),
        "m": model[:200],
        "e": endpoint[:40],
        "pt": str(max(0, int(prompt_tokens))),
        "ct": str(max(0, int(completion_tokens))),
        "l": f"{latency_ms:.3f}",
        "f": "" if ttft_ms is None else f"{ttft_ms:.3f}",
        "s": str(int(status)),
        "x": error[:60],
        "c": client[:64],
    }


def publish(client: redis.Redis, fields: dict[str, str]) -> None:
    """Append one entry (the gateway pipelines the same XADD with its settle call instead)."""
    client.xadd(STREAM, fields, maxlen=STREAM_MAXLEN, approximate=True)


def _ensure_group(client: redis.Redis) -> None:
    try:
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int_or_none(value: str) -> int | None:
    return int(value) if value else None


def drain(client: redis.Redis, consumer: str = "drainer", batch: int = 1000, max_batches: int = 50) -> int:
    """Move stream entries into the database; returns how many new records were written."""
    _ensure_group(client)
    written = 0
    for _ in range(max_batches):
        # Entries a dead drainer read but never acknowledged come first.
        _cursor, claimed, *_ = client.xautoclaim(STREAM, GROUP, consumer, min_idle_time=30_000, count=batch)
        messages = list(claimed)
        if not messages:
            for _stream, items in client.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=batch) or []:
                messages.extend(items)
        if not messages:
            break
        ids = [_text(message_id) for message_id, _fields in messages]
        written += _write(
            [(_text(mid), {_text(k): _text(v) for k, v in fields.items()}) for mid, fields in messages if fields]
        )
        client.xack(STREAM, GROUP, *ids)
        client.xdel(STREAM, *ids)
        if len(messages) < batch:
            break
    return written


def _write(messages: list[tuple[str, dict[str, str]]]) -> int:
    from tenancy.models import ApiKey, Department, UsageRecord

    with transaction.atomic():
        seen = set(
            UsageRecord.objects.filter(stream_id__in=[mid for mid, _ in messages]).values_list("stream_id", flat=True)
        )
        named = [(_int_or_none(f.get("d", "")), _int_or_none(f.get("k", ""))) for _, f in messages]
        departments = set(Department.objects.filter(pk__in={d for d, _ in named if d}).values_list("pk", flat=True))
        keys = set(
            ApiKey.objects.filter(pk__in={k for _, k in named if k}, department_id__in=departments).values_list(
                "pk", flat=True
            )
        )
        records = []
        for mid, fields in messages:
            if mid in seen:
                continue
            department_id = _int_or_none(fields.get("d", ""))
            key_id = _int_or_none(fields.get("k", ""))
            records.append(
                UsageRecord(
                    stream_id=mid,
                    created_at=datetime.fromtimestamp(float(fields["t"]), UTC),
                    department_id=department_id if department_id in departments else None,
                    api_key_id=key_id if key_id in keys else None,
                    deployment_id=_int_or_none(fields.get("p", "")),
                    model=fields.get("m", ""),
                    endpoint=fields.get("e", ""),
                    prompt_tokens=int(fields.get("pt") or 0),
                    completion_tokens=int(fields.get("ct") or 0),
                    latency_ms=float(fields.get("l") or 0),
                    ttft_ms=float(fields["f"]) if fields.get("f") else None,
                    status=int(fields.get("s") or 0),
                    error=fields.get("x", ""),
                    client=fields.get("c", ""),
                )
            )
        _fix_deployments(records)
        UsageRecord.objects.bulk_create(records, batch_size=500)
        add_to_rollups(records)
        _touch_keys(records)
    return len(records)


def _fix_deployments(records: list[Any]) -> None:
    from provisioning.models import Deployment

    wanted = {r.deployment_id for r in records if r.deployment_id is not None}
    existing = set(Deployment.objects.filter(pk__in=wanted).values_list("pk", flat=True)) if wanted else set()
    for record in records:
        if record.deployment_id is not None and record.deployment_id not in existing:
            record.deployment_id = None


def period_start(at: datetime, period: str) -> datetime:
    at = at.astimezone(UTC)
    if period == "hour":
        return at.replace(minute=0, second=0, microsecond=0)
    return at.replace(hour=0, minute=0, second=0, microsecond=0)


def add_to_rollups(records: Iterable[Any]) -> None:
    """Add records to the hourly and daily roll-ups (callers hold a transaction)."""
    from tenancy.models import UsageRollup

    sums: dict[tuple, list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0.0, 0.0, 0])
    for r in records:
        if r.department_id is None or r.api_key_id is None:
            continue  # refused before a department was known (bad key): kept as records only
        for period in ("hour", "day"):
            row = sums[(period, period_start(r.created_at, period), r.department_id, r.api_key_id, r.model)]
            row[0] += 1
            row[1] += 1 if r.status >= 400 else 0
            row[2] += r.prompt_tokens
            row[3] += r.completion_tokens
            row[4] += r.latency_ms
            if r.ttft_ms is not None:
                row[5] += r.ttft_ms
                row[6] += 1
    if not sums:
        return
    # One upsert statement run for every row: new rows inserted, existing ones incremented in the
    # database (SQLite 3.24+ and PostgreSQL both have INSERT … ON CONFLICT DO UPDATE).
    names = ("requests", "errors", "prompt_tokens", "completion_tokens", "latency_ms_sum", "ttft_ms_sum", "ttft_count")
    table = connection.ops.quote_name(UsageRollup._meta.db_table)
    columns = ("period", "start", "department_id", "api_key_id", "model", *names)
    increments = ", ".join(f"{n} = {table}.{n} + excluded.{n}" for n in names)
    placeholders = ", ".join(["%s"] * len(columns))
    # Only names from the model go into the text; every value is bound.
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders}) "  # noqa: S608
    sql += f"ON CONFLICT (period, start, department_id, api_key_id, model) DO UPDATE SET {increments}"
    adapt = connection.ops.adapt_datetimefield_value
    rows = [(period, adapt(start), department_id, key_id, model, *row)
            for (period, start, department_id, key_id, model), row in sums.items()]  # fmt: skip
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)


def _touch_keys(records: list[Any]) -> None:
    from tenancy.models import ApiKey

    latest: dict[int, datetime] = {}
    for r in records:
        if r.api_key_id is not None and r.created_at > latest.get(r.api_key_id, r.created_at - timedelta(1)):
            latest[r.api_key_id] = r.created_at
    if not latest:
        return
    table = connection.ops.quote_name(ApiKey._meta.db_table)
    adapt = connection.ops.adapt_datetimefield_value
    with connection.cursor() as cursor:
        cursor.executemany(
            f"UPDATE {table} SET last_used_at = %s WHERE id = %s AND (last_used_at IS NULL OR last_used_at < %s)",  # noqa: S608
            [(adapt(at), key_id, adapt(at)) for key_id, at in latest.items()],
        )


def tokens_used(department_id: int, since: datetime) -> int:
    """Tokens a department used since ``since`` (a day or month boundary), from the daily roll-ups."""
    from tenancy.models import UsageRollup

    totals = UsageRollup.objects.filter(period="day", department_id=department_id, start__gte=since).aggregate(
        p=Sum("prompt_tokens"), c=Sum("completion_tokens")
    )
    return (totals["p"] or 0) + (totals["c"] or 0)


def rebuild_budgets(client: redis.Redis) -> bool:
    """Restore every department's day/month counters when Redis lost them; True when it did."""
    from tenancy.limiter import Limiter
    from tenancy.models import Department

    if client.exists(MARKER):
        return False
    now = datetime.now(UTC)
    day = period_start(now, "day")
    month = day.replace(day=1)
    limiter = Limiter(client)
    for department_id in Department.objects.values_list("pk", flat=True):
        month_used = tokens_used(department_id, month)
        day_used = tokens_used(department_id, day)
        if day_used or month_used:
            limiter.rebuild_budgets(department_id, day_used=day_used, month_used=month_used)
    client.set(MARKER, now.isoformat())
    return True


def account_gpu_hours(client: redis.Redis) -> int:
    """Add the time since the last call to each ready replica's deployment hour; returns rows touched."""
    from provisioning.models import Replica
    from tenancy.models import DeploymentHours

    now = time.time()
    last = client.getset(GPU_TICK, f"{now:.3f}")
    if last is None:
        return 0
    elapsed = min(max(0.0, now - float(last)), 600.0)  # a long gap (beat down) is not billed blindly
    if not elapsed:
        return 0
    hour = period_start(datetime.fromtimestamp(now, UTC), "hour")
    per_deployment: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for replica in Replica.objects.filter(state=Replica.State.READY).select_related("deployment"):
        gpus = len(replica.gpu_ids) or replica.deployment.tensor_parallel
        per_deployment[replica.deployment_id][0] += elapsed
        per_deployment[replica.deployment_id][1] += elapsed * gpus
    with transaction.atomic():
        for deployment_id, (replica_seconds, gpu_seconds) in per_deployment.items():
            updated = DeploymentHours.objects.filter(deployment_id=deployment_id, start=hour).update(
                replica_seconds=F("replica_seconds") + replica_seconds, gpu_seconds=F("gpu_seconds") + gpu_seconds
            )
            if not updated:
                DeploymentHours.objects.create(
                    deployment_id=deployment_id, start=hour, replica_seconds=replica_seconds, gpu_seconds=gpu_seconds
                )
    return len(per_deployment)
