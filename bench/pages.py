"""Benchmark: server time of every console page with realistic data.

The data: 8 GPUs with 30 days of history at the resolutions retention keeps (raw every 5 s for 24 h,
per minute for 7 days, per hour for 30 days), 200 departments (one large one with 1,000 keys), 5,000
API keys, 1,000,000 usage records over 30 days with the hourly and daily roll-ups the drainer would
have written for them, 12 models, 6 deployments with 8 replicas, 50,000 audit events, 250 users.
It is built once into ``var/bench/pages.sqlite3`` (rebuilt when older than a day or when ``VERSION``
changes; ``--rebuild`` forces it); the GPU history, which charts read relative to now, is rewritten
on every run. ``BENCH_DB=postgres`` builds the same data into a fresh PostgreSQL database
(``bench_pages`` on 127.0.0.1), dropped afterwards unless ``BENCH_KEEP=1`` keeps it for the next run.

Each page is requested REPEATS times (after one request that counts its SQL queries) through
Django's test client, as an appliance admin and, for their pages, as a department admin. Columns:
median and slowest server time, SQL queries per request, response size. A CSV export counts for
the goal by its first chunk (what the user waits for before the download starts); the whole file
is shown on its own row.
Goal (issue #8): every page under 300 ms.
Run: .venv/bin/python bench/pages.py [--rebuild]   (Redis db 7, flushed)
"""

from __future__ import annotations

import json
import os
import random
import secrets
import statistics
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = ROOT / "var" / "bench"
CACHE = WORK / "pages.sqlite3"
DB = os.environ.get("BENCH_DB", "sqlite")
MARKER = WORK / ("pages.json" if DB == "sqlite" else "pages-postgres.json")
KEEP = os.environ.get("BENCH_KEEP") == "1"  # PostgreSQL: keep the database for the next run
VERSION = 1  # change with the data's shape: the cached database is rebuilt
MAX_AGE = timedelta(days=1)
PG_NAME = "bench_pages"
REDIS_URL = "redis://127.0.0.1:6379/7"
REPEATS = int(os.environ.get("BENCH_REPEATS", "7"))
GOAL_MS = 300.0
NODE = "bench"

SHAPE = {
    "gpus": 8,
    "days": 30,
    "departments": 200,
    "keys": 5000,
    "big_department_keys": 1000,
    "records": int(os.environ.get("BENCH_RECORDS", "1000000")),
    "models": 12,
    "deployments": 6,
    "audit_events": 50_000,
    "department_admins": 200,
    "viewers": 50,
}
SERVED = ["llama-3-1-8b", "qwen2-5-72b", "mistral-7b", "bge-m3", "qwen2-5-coder-32b", "gemma-2-27b"]
REPLICAS = [2, 2, 1, 1, 1, 1]  # 8 replicas, one GPU each


def setup() -> None:
    url = f"sqlite:///{CACHE}" if DB == "sqlite" else f"postgres://postgres@127.0.0.1:5432/{PG_NAME}"
    os.environ.update(
        DJANGO_SETTINGS_MODULE="appliance.settings",
        VAR_DIR=str(WORK / "pages-var"),
        DATA_DIR=str(WORK / "pages-var" / "data"),
        DATABASE_URL=url,
        REDIS_URL=REDIS_URL,
        NODE_NAME=NODE,
        LOG_LEVEL="WARNING",
        ALLOWED_HOSTS="testserver",
        GPU_SOURCE="simulated",
    )
    import django

    django.setup()
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def postgres_exists() -> bool:
    import psycopg

    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [PG_NAME]).fetchone() is not None


def cache_is_fresh() -> bool:
    if "--rebuild" in sys.argv or not MARKER.exists():
        return False
    if not (CACHE.exists() if DB == "sqlite" else postgres_exists()):
        return False
    marker = json.loads(MARKER.read_text())
    built = datetime.fromisoformat(marker["built_at"])
    return marker.get("version") == VERSION and marker.get("shape") == SHAPE and datetime.now(UTC) - built < MAX_AGE


def create_postgres() -> None:
    import psycopg

    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {PG_NAME}")
        conn.execute(f"CREATE DATABASE {PG_NAME}")


def drop_postgres() -> None:
    import psycopg
    from django.db import connections

    connections.close_all()
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {PG_NAME} WITH (FORCE)")


# Building the data


def insert_rows(model: Any, columns: list[str], rows: list[tuple], chunk: int = 20_000) -> None:
    """Plain multi-row INSERTs: bulk_create's per-object work costs more than the database here."""
    from django.db import connection

    table = connection.ops.quote_name(model._meta.db_table)
    names = ", ".join(connection.ops.quote_name(c) for c in columns)
    sql = f"INSERT INTO {table} ({names}) VALUES ({', '.join(['%s'] * len(columns))})"  # noqa: S608
    with connection.cursor() as cursor:
        for i in range(0, len(rows), chunk):
            cursor.executemany(sql, rows[i : i + chunk])


def db_time(moment: datetime) -> Any:
    from django.db import connection

    return connection.ops.adapt_datetimefield_value(moment)


def build_catalog(rng: random.Random, now: datetime) -> dict[str, Any]:
    """Users, models, the engine runtime, deployments with replicas, API tokens."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password

    from appliance.models import ApiToken, Profile
    from appliance.roles import Role
    from models_catalog.models import HubEndpoint, LocalModel, ModelFile, ModelJob
    from provisioning.models import Deployment, EngineRuntime, Replica

    user_model = get_user_model()
    admin = user_model.objects.create_superuser("bench-admin", "admin@example.lan", None)
    unusable = make_password(None)
    users = [
        user_model(username=f"dept-admin-{i:03d}", email=f"da{i}@example.lan", password=unusable)
        for i in range(SHAPE["department_admins"])
    ] + [user_model(username=f"viewer-{i:03d}", password=unusable) for i in range(SHAPE["viewers"])]
    user_model.objects.bulk_create(users)
    users = list(user_model.objects.exclude(pk=admin.pk).order_by("username"))
    Profile.objects.bulk_create(
        Profile(user=u, role=Role.DEPARTMENT_ADMIN if u.username.startswith("dept-") else Role.VIEWER) for u in users
    )
    for i in range(5):
        ApiToken.issue(admin, f"script {i}", now + timedelta(days=90) if i % 2 else None)

    hub = HubEndpoint.objects.create(name="Hugging Face", url="https://huggingface.co")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "torch_dtype": "bfloat16",
        "max_position_embeddings": 131072,
        "intermediate_size": 14336,
    }
    models = []
    for i in range(SHAPE["models"]):
        name = SERVED[i] if i < len(SERVED) else f"extra-model-{i}"
        models.append(
            LocalModel(
                repo_id=f"org{i % 4}/{name}",
                node=NODE,
                status=LocalModel.Status.READY,
                endpoint=hub,
                commit=secrets.token_hex(20),
                size_bytes=rng.randint(2, 140) * 1024**3,
                config=config,
                parameter_count=8_000_000_000,
                last_checked_at=now,
            )
        )
    LocalModel.objects.bulk_create(models)
    models = list(LocalModel.objects.order_by("pk"))
    files, jobs = [], []
    for model in models:
        files += [
            ModelFile(model=model, path=p, size=1000, blob_id=secrets.token_hex(20))
            for p in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
        ]
        files += [
            ModelFile(
                model=model,
                path=f"model-{n:05d}-of-00030.safetensors",
                size=5 * 1024**3,
                is_lfs=True,
                sha256=secrets.token_hex(32),
            )
            for n in range(1, 31)
        ]
        for n in range(8):
            start = now - timedelta(days=30 - n * 3)
            jobs.append(
                ModelJob(
                    model=model,
                    repo_id=model.repo_id,
                    kind=ModelJob.Kind.VERIFY if n else ModelJob.Kind.DOWNLOAD,
                    status="succeeded",
                    progress=1.0,
                    created_at=start,
                    started_at=start,
                    finished_at=start + timedelta(minutes=20),
                    node=NODE,
                    log_tail="done\n" * 200,
                    created_by=admin,
                )
            )
    ModelFile.objects.bulk_create(files)
    # One model is downloading: the models list polls, and its job has a progress partial.
    downloading = models[-1]
    LocalModel.objects.filter(pk=downloading.pk).update(status=LocalModel.Status.DOWNLOADING)
    jobs.append(
        ModelJob(
            model=downloading,
            repo_id=downloading.repo_id,
            kind=ModelJob.Kind.DOWNLOAD,
            status="running",
            progress=0.4,
            started_at=now,
            heartbeat_at=now,
            node=NODE,
            created_by=admin,
            progress_detail={"files_done": 12, "files_total": 34, "bytes_done": 60 * 1024**3},
        )
    )
    ModelJob.objects.bulk_create(jobs)

    runtime = EngineRuntime.objects.create(
        node=NODE,
        name="vllm-0.33.0",
        package="vllm",
        version="0.33.0",
        python_path="/opt/vllm/bin/python",
        status="ready",
        checked_at=now,
    )
    logs = WORK / "pages-logs"
    logs.mkdir(parents=True, exist_ok=True)
    deployments, gpu = [], 0
    for i, name in enumerate(SERVED):
        deployment = Deployment.objects.create(
            name=name,
            model=models[i],
            runtime=runtime,
            node=NODE,
            replicas=REPLICAS[i],
            created_by=admin,
            max_model_len=32768,
        )
        deployments.append(deployment)
        for ordinal in range(REPLICAS[i]):
            log = logs / f"{name}-{ordinal}.log"
            log.write_text(
                "".join(f"INFO {n:06d} engine step: 12 running, 0 waiting, KV cache 41%\n" for n in range(5000))
            )
            Replica.objects.create(
                deployment=deployment,
                ordinal=ordinal,
                node=NODE,
                gpu_ids=[gpu],
                port=20000 + gpu,
                state=Replica.State.READY,
                started_at=now - timedelta(days=3),
                ready_at=now - timedelta(days=3),
                log_path=str(log),
                engine_ready_seconds=41.5,
            )
            gpu += 1
    return {"admin": admin, "users": users, "models": models, "deployments": deployments}


def build_tenancy(rng: random.Random, now: datetime, catalog: dict[str, Any]) -> dict[str, Any]:
    """Departments, memberships, keys, prices, deployment hours."""
    from tenancy import keys as key_format
    from tenancy.models import ApiKey, Department, DeploymentHours, Membership, ModelPrice

    words = ["Research", "Sales", "Legal", "Support", "Finance", "Marketing", "Platform", "Data", "Security", "HR"]
    departments = [
        Department(
            name=f"{words[i % len(words)]} {i:03d}",
            contact=f"team{i}@example.lan",
            priority=rng.choice(["high", "normal", "normal", "low"]),
            rpm=rng.choice([None, 600, 1200]),
            tpm=rng.choice([None, 200_000, 1_000_000]),
            tokens_per_day=rng.choice([None, 50_000_000]),
            tokens_per_month=rng.choice([None, 1_000_000_000]),
            max_concurrency=rng.choice([None, 32]),
        )
        for i in range(SHAPE["departments"])
    ]
    Department.objects.bulk_create(departments)
    departments = list(Department.objects.order_by("pk"))
    deployments = catalog["deployments"]
    through = Department.deployments.through
    allowed: dict[int, list[Any]] = {}
    links = []
    for department in departments:
        chosen = rng.sample(deployments, rng.randint(2, len(deployments)))
        allowed[department.pk] = chosen
        links += [through(department_id=department.pk, deployment_id=d.pk) for d in chosen]
    through.objects.bulk_create(links)

    admins = [u for u in catalog["users"] if u.username.startswith("dept-")]
    viewers = [u for u in catalog["users"] if u.username.startswith("viewer-")]
    Membership.objects.bulk_create(
        [Membership(user=u, department=departments[i], role=Membership.Role.ADMIN) for i, u in enumerate(admins)]
        + [Membership(user=u, department=rng.choice(departments), role=Membership.Role.VIEWER) for u in viewers]
    )

    # The first department is large (an IT department issuing a key per application); the others
    # share the remaining keys unevenly.
    owners = [departments[0]] * SHAPE["big_department_keys"]
    rest = SHAPE["keys"] - len(owners)
    owners += [departments[1 + i % (len(departments) - 1)] for i in range(rest)]
    keys = []
    for n, department in enumerate(owners):
        created = now - timedelta(days=rng.uniform(31, 400))
        revoked = created + timedelta(days=rng.uniform(1, 30)) if rng.random() < 0.06 else None
        keys.append(
            ApiKey(
                department=department,
                name=f"app-{n:05d}",
                key_id=secrets.token_urlsafe(8)[: key_format.ID_LENGTH],
                key_hash=secrets.token_hex(32),
                created_at=created,
                revoked_at=revoked,
                created_by=catalog["admin"],
                expires_at=now + timedelta(days=rng.randint(30, 365)) if n % 5 == 0 else None,
                rpm=rng.choice([None, None, 60]),
            )
        )
    ApiKey.objects.bulk_create(keys, batch_size=1000)
    keys = list(ApiKey.objects.order_by("pk"))

    ModelPrice.objects.bulk_create(
        ModelPrice(model=name, prompt_per_million=rng.choice([0.1, 0.5, 2]), completion_per_million=1.5, gpu_hour=2.5)
        for name in SERVED[:4]
    )
    hours = []
    first_hour = (now - timedelta(days=SHAPE["days"])).replace(minute=0, second=0, microsecond=0)
    for index, deployment in enumerate(deployments):
        for h in range(SHAPE["days"] * 24):
            seconds = 3600.0 * REPLICAS[index]
            hours.append(
                DeploymentHours(
                    deployment=deployment,
                    start=first_hour + timedelta(hours=h),
                    replica_seconds=seconds,
                    gpu_seconds=seconds,
                )
            )
    DeploymentHours.objects.bulk_create(hours, batch_size=5000)
    return {"departments": departments, "keys": keys, "allowed": allowed}


def build_usage(rng: random.Random, now: datetime, tenancy: dict[str, Any]) -> dict[str, int]:
    """UsageRecord rows and the hourly and daily UsageRollup rows ``tenancy.usage.add_to_rollups``
    makes of them (same buckets: UTC hour and day; same sums; refused requests without a key are
    kept as records only)."""
    from tenancy.models import ApiKey, UsageRecord, UsageRollup

    keys = tenancy["keys"]
    # A few keys carry most of the traffic (Zipf); revoked keys stopped sending some time ago.
    order = list(range(len(keys)))
    rng.shuffle(order)
    weights = [0.0] * len(keys)
    for rank, k in enumerate(order, start=1):
        weights[k] = 1.0 / rank
    cumulative = list(accumulate(weights))
    served = {}
    for k, key in enumerate(keys):
        choices = tenancy["allowed"][key.department_id]
        primary = rng.choice(choices)
        served[k] = (primary, rng.choice(choices))
    span = SHAPE["days"] * 86400
    end = int(now.timestamp())
    begin = end - span
    count = SHAPE["records"]
    moments = []
    while len(moments) < count:  # busier in working hours
        t = begin + rng.random() * span
        hour = int(t // 3600) % 24
        if rng.random() < (1.0 if 7 <= hour <= 18 else 0.35):
            moments.append(t)
    moments.sort()
    picks = rng.choices(range(len(keys)), cum_weights=cumulative, k=count)

    record_rows: list[tuple] = []
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0.0, 0.0, 0])
    last_used: dict[int, float] = {}
    endpoints = ["chat/completions"] * 8 + ["completions", "embeddings"]
    for i, t in enumerate(moments):
        k = picks[i]
        key = keys[k]
        primary, secondary = served[k]
        deployment = primary if rng.random() < 0.85 else secondary
        roll = rng.random()
        status, error = (200, "")
        if roll < 0.01:
            status, error = 429, "rate_limited"
        elif roll < 0.015:
            status, error = 502, "upstream_error"
        department_id, key_id = key.department_id, key.pk
        if roll > 0.997:  # a bad key: refused before a department was known
            status, error, department_id, key_id = 401, "invalid_api_key", None, None
        prompt = rng.randint(20, 4000) if status == 200 else 0
        completion = rng.randint(5, 900) if status == 200 and deployment.name != "bge-m3" else 0
        latency = round(rng.uniform(80, 9000) if status == 200 else rng.uniform(1, 30), 3)
        ttft = round(rng.uniform(40, 900), 3) if status == 200 and rng.random() < 0.7 else None
        at = datetime.fromtimestamp(t, UTC)
        record_rows.append(
            (
                f"{int(t * 1000)}-{i}",
                db_time(at),
                department_id,
                key_id,
                deployment.pk,
                deployment.name,
                endpoints[i % len(endpoints)],
                prompt,
                completion,
                latency,
                ttft,
                status,
                error,
                f"10.{i % 250}.{(i // 250) % 250}.7",
            )
        )
        if key_id is None:
            continue
        last_used[key_id] = t
        second = int(t)
        for period, width in (("hour", 3600), ("day", 86400)):
            row = sums[(period, second - second % width, department_id, key_id, deployment.name)]
            row[0] += 1
            row[1] += 1 if status >= 400 else 0
            row[2] += prompt
            row[3] += completion
            row[4] += latency
            if ttft is not None:
                row[5] += ttft
                row[6] += 1
    insert_rows(
        UsageRecord,
        [
            "stream_id",
            "created_at",
            "department_id",
            "api_key_id",
            "deployment_id",
            "model",
            "endpoint",
            "prompt_tokens",
            "completion_tokens",
            "latency_ms",
            "ttft_ms",
            "status",
            "error",
            "client",
        ],
        record_rows,
    )
    del record_rows
    rollup_rows = [
        (period, db_time(datetime.fromtimestamp(start, UTC)), dept, key, model, *values)
        for (period, start, dept, key, model), values in sums.items()
    ]
    insert_rows(
        UsageRollup,
        [
            "period",
            "start",
            "department_id",
            "api_key_id",
            "model",
            "requests",
            "errors",
            "prompt_tokens",
            "completion_tokens",
            "latency_ms_sum",
            "ttft_ms_sum",
            "ttft_count",
        ],
        rollup_rows,
    )
    for key_id, t in last_used.items():
        ApiKey.objects.filter(pk=key_id).update(last_used_at=datetime.fromtimestamp(t, UTC))
    hourly = sum(1 for k in sums if k[0] == "hour")
    return {"usage_records": count, "rollups_hourly": hourly, "rollups_daily": len(sums) - hourly}


def build_audit_and_alerts(rng: random.Random, now: datetime, catalog: dict[str, Any]) -> None:
    from appliance.models import AuditEvent
    from gpus.collect import collect
    from gpus.models import Alert, Gpu, Webhook, WebhookDelivery
    from gpus.probe import SimulatedProbe

    actions = [
        ("auth.login", "", ""),
        ("api_key.issue", "tenancy.apikey", "app"),
        ("api_key.revoke", "tenancy.apikey", "app"),
        ("department.update", "tenancy.department", "Research"),
        ("deployment.restart", "provisioning.deployment", "llama-3-1-8b"),
        ("model.verify", "models_catalog.localmodel", "org0/llama-3-1-8b"),
        ("model_price.set", "tenancy.modelprice", "mistral-7b"),
        ("user.set_role", "auth.user", "viewer-001"),
    ]
    names = ["bench-admin"] + [u.username for u in catalog["users"][:40]]
    span = SHAPE["days"] * 86400
    events = []
    for i in range(SHAPE["audit_events"]):
        action, target_type, target = actions[i % len(actions)]
        events.append(
            AuditEvent(
                created_at=now - timedelta(seconds=span * i / SHAPE["audit_events"]),
                actor_name=rng.choice(names),
                action=action,
                target_type=target_type,
                target_id=str(i % 500) if target_type else "",
                target_repr=f"{target} {i % 500}" if target else "",
                outcome="ok" if i % 50 else "denied",
                source_ip=f"10.0.{i % 200}.{i % 250}",
                detail={"department": "Research 000"} if i % 3 == 0 else {},
            )
        )
    AuditEvent.objects.bulk_create(events, batch_size=5000)

    collect(SimulatedProbe(count=SHAPE["gpus"]), node=NODE)
    gpus = list(Gpu.objects.order_by("index"))
    resolved = []
    for n in range(60):
        opened = now - timedelta(hours=12 * n + 3)
        resolved.append(
            Alert(
                gpu=gpus[n % len(gpus)],
                rule="temperature",
                severity="warning",
                message="Temperature 87 °C over 85 °C",
                opened_at=opened,
                last_seen_at=opened + timedelta(minutes=9),
                resolved_at=opened + timedelta(minutes=10),
            )
        )
    Alert.objects.bulk_create(resolved)
    Alert.objects.create(gpu=gpus[3], rule="pcie_replay", severity="warning", message="PCIe replays 14 per minute")
    hook = Webhook.objects.create(name="ops pager", url="https://pager.example.lan/hook")
    Webhook.objects.create(name="chat", url="https://chat.example.lan/hook")
    WebhookDelivery.objects.bulk_create(
        WebhookDelivery(
            webhook=hook,
            alert=a,
            event="opened",
            payload={"alert": a.pk},
            status="sent",
            attempts=1,
            created_at=a.opened_at,
        )
        for a in Alert.objects.all()
    )


def write_gpu_history(rng: random.Random) -> int:
    """The GPU samples retention keeps for 30 days of history, up to now (rewritten every run)."""
    from django.utils import timezone

    from gpus.models import Gpu, GpuSample

    GpuSample.objects.all().delete()
    now = timezone.now().replace(microsecond=0)
    plan = [
        ("raw", timedelta(seconds=5), timedelta(hours=24)),
        ("minute", timedelta(minutes=1), timedelta(days=7)),
        ("hour", timedelta(hours=1), timedelta(days=SHAPE["days"])),
    ]
    total = 0
    for gpu in Gpu.objects.all():
        rows = []
        for resolution, step, span in plan:
            moment = now - span
            while moment < now:
                util = rng.uniform(0, 100)
                rows.append(
                    (
                        gpu.pk,
                        resolution,
                        db_time(moment),
                        util,
                        int(util * 0.8 * 1024**3),
                        rng.uniform(30, 80),
                        rng.uniform(80, 700),
                        1980.0,
                        0,
                        0,
                        0,
                        0,
                    )
                )
                moment += step
        insert_rows(
            GpuSample,
            [
                "gpu_id",
                "resolution",
                "time",
                "util_gpu",
                "mem_used",
                "temperature",
                "power_draw",
                "sm_clock",
                "throttle_reasons",
                "pcie_replay",
                "ecc_dbe_volatile",
                "xid_count",
            ],
            rows,
        )
        total += len(rows)
    return total


def build() -> dict[str, Any]:
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.utils import timezone

    started = time.perf_counter()
    call_command("migrate", verbosity=0)
    rng = random.Random(8)  # noqa: S311 - synthetic data
    now = timezone.now().replace(microsecond=0)
    with transaction.atomic():
        catalog = build_catalog(rng, now)
        tenancy = build_tenancy(rng, now, catalog)
        counts = build_usage(rng, now, tenancy)
        build_audit_and_alerts(rng, now, catalog)
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    else:
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
    counts["build_s"] = round(time.perf_counter() - started, 1)
    return counts


# Measuring


class Page:
    def __init__(self, label: str, url: str, *, hx: bool = False, stream: bool = False, counted: bool = True):
        self.label, self.url, self.hx, self.stream, self.counted = label, url, hx, stream, counted
        self.samples: list[float] = []
        self.queries = 0
        self.size = 0

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)


def fetch(client: Any, page: Page, whole: bool) -> tuple[int, int]:
    headers = {"HX-Request": "true"} if page.hx else {}
    response = client.get(page.url, headers=headers)
    if response.status_code != 200:
        raise SystemExit(f"{page.label}: {page.url} answered {response.status_code}")
    if not page.stream:
        return len(response.content), 1
    chunks = iter(response.streaming_content)
    size = len(next(chunks, b""))
    lines = 0
    if whole:
        for chunk in chunks:
            size += len(chunk)
            lines += chunk.count(b"\n")
    response.close()
    return size, lines


def measure(client: Any, page: Page, whole: bool = False) -> Page:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        page.size, _lines = fetch(client, page, whole)
    page.queries = len(queries)
    for _ in range(REPEATS):
        started = time.perf_counter()
        fetch(client, page, whole)
        page.samples.append((time.perf_counter() - started) * 1000)
    return page


def pages(ids: dict[str, Any]) -> tuple[list[Page], list[Page]]:
    from tenancy.reports import today

    last = today()
    week = f"start={last - timedelta(days=6)}&end={last}"
    month = f"start={last - timedelta(days=29)}&end={last}"
    two_days = f"start={last - timedelta(days=1)}&end={last}"
    big, small = ids["big_department"], ids["small_department"]
    model, deployment, job = ids["model"], ids["deployment"], ids["job"]
    this_month = f"{last:%Y-%m}"
    previous_month = f"{last.replace(day=1) - timedelta(days=1):%Y-%m}"
    admin = [
        Page("overview", "/"),
        Page("overview: health panel (htmx poll)", "/overview/health", hx=True),
        Page("models list", "/models/"),
        Page("models list: table (htmx poll)", "/models/", hx=True),
        Page("model detail", f"/models/{model}/"),
        Page(
            "model detail: estimate panel (htmx)",
            f"/models/{model}/estimate?context_length=32768&concurrency=16",
            hx=True,
        ),
        Page("model job progress (htmx poll)", f"/models/jobs/{job}/progress", hx=True),
        Page("model sources", "/models/sources/"),
        Page("add a model", "/models/add"),
        Page("deployments list", "/deployments/"),
        Page("deployment detail", f"/deployments/{deployment}/"),
        Page("deployment detail: replicas (htmx poll)", f"/deployments/{deployment}/", hx=True),
        Page("deploy form", f"/deployments/new?model={model}"),
        Page("GPUs", "/gpus/"),
        Page("GPUs: tiles (htmx poll)", "/gpus/tiles", hx=True),
        Page("GPU chart 1 h (raw)", "/gpus/chart?range=1h&metric=util_gpu"),
        Page("GPU chart 24 h (minute)", "/gpus/chart?range=24h&metric=util_gpu"),
        Page("GPU chart 7 d (hour)", "/gpus/chart?range=7d&metric=temperature"),
        Page("GPU chart 30 d (hour)", "/gpus/chart?range=30d&metric=mem_used"),
        Page("departments list", "/departments/"),
        Page("departments list, page 4", "/departments/?page=4"),
        Page("department detail (1,000 keys)", f"/departments/{big}/"),
        Page("department detail (typical, ~20 keys)", f"/departments/{small}/"),
        Page("usage: default (7 d, by department)", "/departments/usage/"),
        Page("usage 2 d by key (hourly roll-ups)", f"/departments/usage/?{two_days}&group=key"),
        Page("usage 7 d by model", f"/departments/usage/?{week}&group=model"),
        Page("usage 30 d by department", f"/departments/usage/?{month}&group=department"),
        Page("usage 30 d by key", f"/departments/usage/?{month}&group=key"),
        Page("usage 30 d by model", f"/departments/usage/?{month}&group=model"),
        Page("usage 30 d, one department by key", f"/departments/usage/?{month}&group=key&department={big}"),
        Page("usage CSV 7 d: first chunk", f"/departments/usage.csv?{week}", stream=True),
        Page("usage CSV 30 d: first chunk", f"/departments/usage.csv?{month}", stream=True),
        Page("chargeback (this month)", f"/departments/chargeback/?month={this_month}"),
        Page("chargeback (last month)", f"/departments/chargeback/?month={previous_month}"),
        Page("chargeback CSV: first chunk", f"/departments/chargeback.csv?month={this_month}", stream=True),
        Page("audit", "/audit/"),
        Page("audit, filtered by action", "/audit/?action=api_key"),
        Page("audit, page 500", "/audit/?page=500"),
        Page("users", "/settings/users/"),
        Page("API tokens", "/settings/tokens/"),
    ]
    exports = [
        Page("usage CSV 7 d: whole file", f"/departments/usage.csv?{week}", stream=True, counted=False),
        Page("usage CSV 30 d: whole file", f"/departments/usage.csv?{month}", stream=True, counted=False),
    ]
    department_admin = [
        Page("dept admin: departments list", "/departments/"),
        Page("dept admin: own department (1,000 keys)", f"/departments/{big}/"),
        Page("dept admin: usage default (7 d)", "/departments/usage/"),
        Page("dept admin: usage 30 d by key", f"/departments/usage/?{month}&group=key"),
        Page("dept admin: chargeback", f"/departments/chargeback/?month={this_month}"),
    ]
    return admin + exports, department_admin


def ensure_data() -> dict[str, int]:
    """Set Django up on the data set, built first unless the cached one is fresh; its row counts.
    (Also used by bench/ops.py, which backs this data set up and restores it.)"""
    WORK.mkdir(parents=True, exist_ok=True)
    fresh = cache_is_fresh()
    if DB == "sqlite" and not fresh:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{CACHE}{suffix}").unlink(missing_ok=True)
        MARKER.unlink(missing_ok=True)
    if DB == "postgres" and not fresh:
        create_postgres()
    setup()
    from django.core.management import call_command

    if fresh:
        call_command("migrate", verbosity=0)  # new migrations (indexes) apply to the cached data
        return json.loads(MARKER.read_text())["counts"]
    print(f"building the data set into {DB} (a few minutes)…", flush=True)
    counts = build()
    if DB == "sqlite" or KEEP:
        marker = {"version": VERSION, "shape": SHAPE, "counts": counts, "built_at": datetime.now(UTC).isoformat()}
        MARKER.write_text(json.dumps(marker))
    return counts


def main() -> None:
    try:
        counts = ensure_data()
        gpu_rows = write_gpu_history(random.Random(9))  # noqa: S311 - synthetic data

        from django.contrib.auth import get_user_model
        from django.db import connection
        from django.db.models import Count
        from django.test import Client

        from models_catalog.models import ModelJob
        from provisioning.models import Deployment
        from tenancy.models import Department, UsageRollup

        users = get_user_model().objects
        by_keys = Department.objects.annotate(n=Count("api_keys")).order_by("-n", "pk")
        ids = {
            "big_department": by_keys[0].pk,
            "small_department": Department.objects.annotate(n=Count("api_keys")).filter(n__gte=15, n__lte=25)[0].pk,
            "model": Deployment.objects.get(name=SERVED[0]).model_id,
            "deployment": SERVED[0],
            "job": ModelJob.objects.get(status="running").pk,
        }
        admin_pages, dept_pages = pages(ids)
        admin = Client()
        admin.force_login(users.get(username="bench-admin"))
        dept_admin = Client()
        dept_admin.force_login(users.get(username="dept-admin-000"))
        for page in admin_pages:
            measure(admin, page, whole=not page.counted)
        for page in dept_pages:
            measure(dept_admin, page)
        rollups = {p: UsageRollup.objects.filter(period=p).count() for p in ("hour", "day")}
        vendor = connection.vendor
    finally:
        if DB == "postgres" and not KEEP:
            drop_postgres()
            MARKER.unlink(missing_ok=True)

    measured = admin_pages + dept_pages
    print(
        f"\n{vendor}: {SHAPE['gpus']} GPUs with {gpu_rows:,} samples, {SHAPE['departments']} departments, "
        f"{SHAPE['keys']:,} keys, {counts['usage_records']:,} usage records, {rollups['hour']:,} hourly and "
        f"{rollups['day']:,} daily roll-up rows, {SHAPE['audit_events']:,} audit events; "
        f"{REPEATS} requests per page after one that counts queries\n"
    )
    print(f"| {'page':48} | {'p50 ms':>8} | {'max ms':>8} | {'queries':>7} | {'KB':>7} |")
    print(f"| {'-' * 48} | {'-' * 7}: | {'-' * 7}: | {'-' * 6}: | {'-' * 6}: |")
    for page in measured:
        flag = " *" if page.counted and page.p50 > GOAL_MS else ""
        label = page.label + ("" if page.counted else " (export)")
        print(
            f"| {label + flag:48} | {page.p50:8.1f} | {max(page.samples):8.1f} | {page.queries:7d} | "
            f"{page.size / 1024:7.1f} |"
        )
    counted = [p for p in measured if p.counted]
    slowest = max(counted, key=lambda p: p.p50)
    over = [p for p in counted if p.p50 > GOAL_MS]
    print(
        f"\ngoal: every page under {GOAL_MS:.0f} ms (median; * marks a page over it). "
        "Exports are not pages: their whole-file rows are shown, not counted."
    )
    print(
        json.dumps(
            {
                "db": vendor,
                "slowest_page": slowest.label,
                "slowest_ms": round(slowest.p50, 1),
                "pages_over_300ms": len(over),
                "over": [p.label for p in over],
                "pages_ms": {p.label: round(p.p50, 1) for p in measured},
            },
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
