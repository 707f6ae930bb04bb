"""Usage records off the hot path: the gateway appends one entry per request to a Redis stream
(``entry()`` builds it); ``drain()`` moves entries into ``UsageRecord`` rows in batches and adds them
to the hourly/daily roll-ups in the same transaction, then acknowledges them. A drainer that died
mid-batch leaves its entries pending; the next one claims them, and ``stream_id`` keeps a batch
that was already written from being counted twice. Only acknowledged entries leave the stream (no
trimming by length). Strings are cleaned of control characters and bytes that are not UTF-8 (the
tokens are billed all the same); an entry the database still refuses is tried alone and, refused
again, set aside (``SetAsideUsage``, with the reason, listed for admins) so that it never blocks the
entries after it. A database that is down is not a refusal: nothing is acknowledged, all is retried.

``rebuild_budgets()`` restores the limiter's day/month counters from the roll-ups after Redis lost
its data (a marker key that only a rebuild sets tells that it did). ``account_gpu_hours()`` adds
the GPU time ready replicas held to ``DeploymentHours`` for chargeback."""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import redis
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection, transaction
from django.db.models import F, Sum

STREAM = "usage:stream"
GROUP = "db"
log = logging.getLogger(__name__)
# What a recorded string may not hold: C0/C1 controls (NUL among them), lone surrogates, and the
# bidirectional overrides that make a text read otherwise than it is.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u200e\u200f\u202a-\u202e\u2066-\u2069]")
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
    """One stream entry (flat strings, as Redis streams store them; strings cleaned and cut to their
    columns' lengths)."""
    return {
        "t": f"{time.time() if at is None else at:.6f}",
        "d": "" if department_id is None else str(department_id),
        "k": "" if key_id is None else str(key_id),
        "p": "" if deployment_id is None else str(deployment_id),
        "m": clean(model, 200),
        "e": clean(endpoint, 40),
        "pt": str(max(0, int(prompt_tokens))),
        "ct": str(max(0, int(completion_tokens))),
        "l": f"{latency_ms:.3f}",
        "f": "" if ttft_ms is None else f"{ttft_ms:.3f}",
        "s": str(int(status)),
        "x": clean(error, 60),
        "c": clean(client, 64),
    }


def clean(value: str, length: int) -> str:
    """``value`` without control characters, lone surrogates or bidirectional overrides, at most
    ``length`` characters."""
    if value.isascii() and value.isprintable():  # the usual case, without the regular expression
        return value[:length]
    return _UNPRINTABLE.sub("", value)[:length]


def publish(client: redis.Redis, fields: dict[str, str]) -> None:
    """Append one entry (the gateway pipelines the same XADD with its settle call instead). The stream
    is never trimmed: entries leave it only once the drain acknowledged them."""
    client.xadd(STREAM, fields)


def _ensure_group(client: redis.Redis) -> None:
    try:
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


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
    """Write a batch in one transaction; when the database refuses it, each entry alone, setting
    aside those it still refuses. Returns the records written."""
    records, refused = [], []
    for mid, fields in messages:
        try:
            records.append(_record(mid, fields))
        except (KeyError, ValueError, OverflowError) as exc:
            refused.append((mid, fields, f"unreadable entry: {type(exc).__name__}: {exc}"))
    try:
        written = _insert(records)
    except (OperationalError, InterfaceError):
        raise  # the database is away: nothing is acknowledged, the batch comes back
    except (DatabaseError, ValueError) as exc:
        log.warning("the database refused a usage batch (%s); writing its entries one by one", exc)
        written, fields_of = 0, dict(messages)
        for record in records:
            try:
                written += _insert([record])
            except (OperationalError, InterfaceError):
                raise
            except (DatabaseError, ValueError) as one:
                refused.append((record.stream_id, fields_of[record.stream_id], f"{type(one).__name__}: {one}"))
    if refused:
        _set_aside(refused)
    return written


def _record(mid: str, fields: dict[str, str]) -> Any:
    from tenancy.models import UsageRecord

    return UsageRecord(
        stream_id=mid,
        created_at=datetime.fromtimestamp(float(fields["t"]), UTC),
        department_id=_int_or_none(fields.get("d", "")),
        api_key_id=_int_or_none(fields.get("k", "")),
        deployment_id=_int_or_none(fields.get("p", "")),
        model=clean(fields.get("m", ""), 200),
        endpoint=clean(fields.get("e", ""), 40),
        prompt_tokens=_count(fields.get("pt")),
        completion_tokens=_count(fields.get("ct")),
        latency_ms=float(fields.get("l") or 0),
        ttft_ms=float(fields["f"]) if fields.get("f") else None,
        status=int(fields.get("s") or 0),
        error=clean(fields.get("x", ""), 60),
        client=clean(fields.get("c", ""), 64),
    )


def _count(value: str | None) -> int:
    number = int(value or 0)
    if not 0 <= number < 2**31:
        raise ValueError(f"a token count out of range: {number}")
    return number


def _insert(records: list[Any]) -> int:
    from tenancy.models import ApiKey, Department, UsageRecord

    with transaction.atomic():
        seen = set(
            UsageRecord.objects.filter(stream_id__in=[r.stream_id for r in records]).values_list("stream_id", flat=True)
        )
        records = [r for r in records if r.stream_id not in seen]
        departments = set(
            Department.objects.filter(pk__in={r.department_id for r in records if r.department_id}).values_list(
                "pk", flat=True
            )
        )
        keys = set(
            ApiKey.objects.filter(
                pk__in={r.api_key_id for r in records if r.api_key_id}, department_id__in=departments
            ).values_list("pk", flat=True)
        )
        for record in records:
            if record.department_id not in departments:
                record.department_id = None
            if record.api_key_id not in keys:
                record.api_key_id = None
        _fix_deployments(records)
        UsageRecord.objects.bulk_create(records, batch_size=500)
        add_to_rollups(records)
        _touch_keys(records)
    return len(records)


def _set_aside(refused: list[tuple[str, dict[str, str], str]]) -> None:
    from tenancy.models import SetAsideUsage

    log.error("%d usage entries set aside (the database refused them); see Usage → Set aside", len(refused))
    SetAsideUsage.objects.bulk_create(
        [SetAsideUsage(stream_id=mid, reason=clean(reason, 500), fields=json.dumps(fields, ensure_ascii=True))
         for mid, fields, reason in refused],
        ignore_conflicts=True,
    )  # fmt: skip


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
    """Tokens a department used since ``since`` (a day or month boundary of the appliance's time zone),
    from the hourly roll-ups (its days need not be UTC days; the hour that holds the boundary counts
    whole, so a rebuilt budget errs on the side of the department having used more)."""
    from tenancy.models import UsageRollup

    since = period_start(since, "hour")
    totals = UsageRollup.objects.filter(period="hour", department_id=department_id, start__gte=since).aggregate(
        p=Sum("prompt_tokens"), c=Sum("completion_tokens")
    )
    return (totals["p"] or 0) + (totals["c"] or 0)


def rebuild_budgets(client: redis.Redis) -> bool:
    """Restore every department's day/month counters when Redis lost them; True when it did."""
    from tenancy.limiter import Limiter
    from tenancy.models import Department

    if client.exists(MARKER):
        return False
    seconds, micros = client.time()  # the limiter's clock, in the appliance's time zone
    now = datetime.fromtimestamp(seconds + micros / 1e6, ZoneInfo(settings.TIME_ZONE))
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
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
    for replica in Replica.objects.filter(state=Replica.State.READY).select_related("deployment__runtime"):
        # An engine on the CPU build holds no GPU: its time is counted, its GPU-hours are none.
        gpus = 0 if replica.deployment.runtime.is_cpu else len(replica.gpu_ids) or replica.deployment.tensor_parallel
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
