"""Gateway settings: every value comes from the environment (docs/decisions.md#configuration)."""
from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
(BASE_DIR / "var").mkdir(exist_ok=True)


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: str = "False") -> bool:
    value = os.environ.get(name, default)
    if value not in ("True", "False", "true", "false", "1", "0"):
        raise ImproperlyConfigured(f"{name} must be True or False, not {value!r}")
    return value in ("True", "true", "1")


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer") from None


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number") from None


def env_list(name: str, default: list[str]) -> list[str]:
    """A JSON list (FastChat's CLI format) or a comma-separated string."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().startswith("["):
        return [str(item) for item in json.loads(value)]
    return [item.strip() for item in value.split(",") if item.strip()]


def env_secret(name: str, default: str = "") -> str:
    """Read NAME, or the file named by NAME_FILE (Docker/systemd secrets)."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(name, default)


def demo_secret_key() -> str:
    """`manage.py demo`'s own key: made once and kept in var/, so admin sessions outlive a restart."""
    path = BASE_DIR / "var" / "demo-secret-key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(50))
    return path.read_text().strip()


# Core Django
DEBUG = env_bool("DJANGO_DEBUG")
# `manage.py demo` runs the whole stack on one machine and needs no configuration.
RUNNING_DEMO = sys.argv[1:2] == ["demo"]
# Sessions, CSRF tokens and password resets are signed with it: a known key lets anyone forge
# an admin session, so a production process refuses to start without one.
SECRET_KEY = env_secret("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if RUNNING_DEMO:
        SECRET_KEY = demo_secret_key()
    elif DEBUG:
        SECRET_KEY = "insecure-development-key-change-me"
    else:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY (or DJANGO_SECRET_KEY_FILE) must be set when DJANGO_DEBUG is off, e.g. to the "
            "output of: python -c 'import secrets; print(secrets.token_urlsafe(50))'"
        )
# Host names this gateway answers to (the admin and /api/keys/ check it). Behind nginx, list
# the public names; the loopback names keep local health checks and `manage.py demo` working.
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])
USE_X_FORWARDED_HOST = env_bool("DJANGO_USE_X_FORWARDED_HOST")

# Behind a proxy that terminates TLS (deploy/nginx/gateway.conf sets X-Forwarded-Proto): trust
# its scheme header, send cookies over HTTPS only and ask browsers to stay on HTTPS (HSTS, sent
# by the admin and /api/keys/ on HTTPS requests). Each can be set on its own as well.
GATEWAY_BEHIND_TLS = env_bool("GATEWAY_BEHIND_TLS")
if env_bool("DJANGO_SECURE_PROXY_SSL_HEADER", str(GATEWAY_BEHIND_TLS)):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", str(GATEWAY_BEHIND_TLS))
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", str(GATEWAY_BEHIND_TLS))
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 31536000 if GATEWAY_BEHIND_TLS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS")

# daphne's app only turns `runserver` into an ASGI server, and it imports Twisted (27 MB per
# process), so only runserver loads it; served processes run uvicorn or daphne directly.
SERVE_WITH_RUNSERVER = sys.argv[1:2] == ["runserver"]

INSTALLED_APPS = [
    *(["daphne"] if SERVE_WITH_RUNSERVER else []),
    "keys.admin_site.GatewayAdminConfig",  # django.contrib.admin with the gateway's site (keys/admin_site.py)
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "openai_api",
    "keys",
    "upstreams",
    "axes",  # lock-out after failed logins (keys/login.py)
    "django_otp",
    "django_otp.plugins.otp_totp",
]

# The admin and the key-management API get Django's full stack.
MIDDLEWARE = [
    "openai_api.middleware.request_id",
    "openai_api.middleware.cors",  # answers on the OpenAI paths only, never the admin's or /api/keys/
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",  # request.user.is_verified() for the admin's second factor
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Who changed what from where (keys/audit/): not on the OpenAI API path below.
    "keys.audit.middleware.audit_scope",
    "axes.middleware.AxesMiddleware",  # turns a locked-out login into keys/login.py's 429 page
]
# The OpenAI API path gets only async middleware: each sync middleware costs a thread hop
# per request (docs/decisions.md#performance). See gateway_project/asgi.py.
API_MIDDLEWARE = [
    "openai_api.middleware.request_id",
    "openai_api.middleware.cors",
]
API_PATH_PREFIXES = ("/v1/", "/api/v1/", "/health", "/metrics")

ROOT_URLCONF = "gateway_project.urls"
API_URLCONF = "openai_api.urls"
ASGI_APPLICATION = "gateway_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "keys.admin_site.login_options",  # single sign-on link, token field
            ],
        },
    },
]

# Database: SQLite file by default, DATABASE_URL for PostgreSQL.
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'var' / 'gateway.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
    )
}
# A database that does not answer fails a connection attempt after this many seconds (PostgreSQL),
# so key look-ups answer 503 instead of hanging (openai_api/auth.py).
GATEWAY_DATABASE_CONNECT_TIMEOUT = env_int("GATEWAY_DATABASE_CONNECT_TIMEOUT", 2)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", GATEWAY_DATABASE_CONNECT_TIMEOUT)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A transaction takes SQLite's write lock when it begins and waits for it: a deferred one that
    # read first fails at once ("database is locked") when another thread writes (usage rows
    # while a login writes its session).
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("transaction_mode", "IMMEDIATE")
    # Write-ahead logging: readers (the admin, key look-ups) never wait for the usage writer, and a
    # commit appends to one file instead of writing, syncing and deleting a rollback journal. A
    # stored Responses answer costs a fifth less CPU, one process stores 1.4x as many per second
    # (bench/README.md). Commits stay durable (synchronous=FULL, SQLite's default); docs/decisions.md#performance.
    DATABASES["default"]["OPTIONS"].setdefault("init_command", "PRAGMA journal_mode=WAL;")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
# Serve the admin's static files from the gateway itself (set False when nginx serves them).
GATEWAY_SERVE_STATIC = env_bool("GATEWAY_SERVE_STATIC", "True")

# Requests bigger than this get 413 (images travel inline as base64), chunked ones as soon as
# they pass it.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("GATEWAY_MAX_BODY_BYTES", 16 * 1024 * 1024)
# Bounds on what one request may ask for (400 naming the parameter, before any upstream call).
GATEWAY_MAX_JSON_DEPTH = env_int("GATEWAY_MAX_JSON_DEPTH", 64)
GATEWAY_MAX_JSON_VALUES = env_int("GATEWAY_MAX_JSON_VALUES", 300_000)
# A model name longer than the usage rows' column (200) could not be recorded as it is.
GATEWAY_MAX_MODEL_CHARS = env_int("GATEWAY_MAX_MODEL_CHARS", 200)
GATEWAY_MAX_GENERATIONS = env_int("GATEWAY_MAX_GENERATIONS", 128)
GATEWAY_MAX_MESSAGES = env_int("GATEWAY_MAX_MESSAGES", 2048)
GATEWAY_MAX_CONTENT_PARTS = env_int("GATEWAY_MAX_CONTENT_PARTS", 64)
GATEWAY_MAX_CONTENT_CHARS = env_int("GATEWAY_MAX_CONTENT_CHARS", 10 * 1024 * 1024)
GATEWAY_MAX_STOP = env_int("GATEWAY_MAX_STOP", 16)
GATEWAY_MAX_STOP_CHARS = env_int("GATEWAY_MAX_STOP_CHARS", 256)
GATEWAY_MAX_EMBEDDING_INPUTS = env_int("GATEWAY_MAX_EMBEDDING_INPUTS", 2048)
GATEWAY_EMBEDDING_CONCURRENCY = env_int("GATEWAY_EMBEDDING_CONCURRENCY", 4)
GATEWAY_MAX_TOKEN_CHECK_ITEMS = env_int("GATEWAY_MAX_TOKEN_CHECK_ITEMS", 64)
GATEWAY_MAX_RESPONSE_ITEMS = env_int("GATEWAY_MAX_RESPONSE_ITEMS", 2048)  # /v1/responses input items

# Upstream registry: the Fernet key(s) that encrypt upstream API keys at rest, newest first
# (comma-separated; the older ones only decrypt, until `manage.py upstreams rotate-key`).
GATEWAY_ENCRYPTION_KEY = env_secret("GATEWAY_ENCRYPTION_KEY")

# FastChat backends
CONTROLLER_ADDRESS = env_str("CONTROLLER_ADDRESS", "http://localhost:21001").rstrip("/")
FASTCHAT_WORKER_API_TIMEOUT = env_float("FASTCHAT_WORKER_API_TIMEOUT", 100)
FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE = env_int("FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE", 4)
# Controller calls are small and fast; a controller that does not answer is down.
FASTCHAT_CONTROLLER_TIMEOUT = env_float("FASTCHAT_CONTROLLER_TIMEOUT", 10)
# Overall bound on one upstream call, a whole generation stream included, however steadily the
# upstream trickles bytes (the timeouts above bound silence only).
GATEWAY_UPSTREAM_DEADLINE = env_float("GATEWAY_UPSTREAM_DEADLINE", 900)
# Largest upstream answer body, and largest single stream chunk, read (bigger: 502).
GATEWAY_UPSTREAM_MAX_BYTES = env_int("GATEWAY_UPSTREAM_MAX_BYTES", 64 * 1024 * 1024)
# Hosts a worker address handed out by the controller may name (empty: any host).
GATEWAY_WORKER_ALLOWED_HOSTS = env_list("GATEWAY_WORKER_ALLOWED_HOSTS", [])
# How long the controller's model list is trusted before it is asked again.
GATEWAY_MODEL_LIST_TTL = env_float("GATEWAY_MODEL_LIST_TTL", 5)
# Seconds a model's worker addresses (several answers of the controller) are reused before the
# controller is asked again; 0 asks it on every request.
GATEWAY_WORKER_ADDRESS_TTL = env_float("GATEWAY_WORKER_ADDRESS_TTL", 1.0)
# How often a dead worker address is traded for another before the request gets 503.
GATEWAY_WORKER_RETRIES = env_int("GATEWAY_WORKER_RETRIES", 3)
# How long a key's state is trusted in process memory (revocations apply within this time).
GATEWAY_KEY_CACHE_SECONDS = env_float("GATEWAY_KEY_CACHE_SECONDS", 1.0)
# While the database cannot be read, a key known to the process keeps working from memory for
# this long after it was last read; keys it does not know get 503.
GATEWAY_KEY_GRACE_SECONDS = env_float("GATEWAY_KEY_GRACE_SECONDS", 300)
# The longest a request waits for its key to be read from the database before it gets 503.
GATEWAY_KEY_LOOKUP_TIMEOUT = env_float("GATEWAY_KEY_LOOKUP_TIMEOUT", 2.0)
# Tokens found to be no key are remembered (least recently seen forgotten first) up to this many.
GATEWAY_KEY_NEGATIVE_CACHE_SIZE = env_int("GATEWAY_KEY_NEGATIVE_CACHE_SIZE", 10_000)
# On SIGTERM, streams still running after this many seconds end with an error event.
GATEWAY_DRAIN_SECONDS = env_float("GATEWAY_DRAIN_SECONDS", 20)
# Young-generation threshold of Python's cyclic GC in served processes (0 keeps Python's 700).
GATEWAY_GC_GEN0_THRESHOLD = env_int("GATEWAY_GC_GEN0_THRESHOLD", 20000)
# One JSON line per API request on the "gateway.access" logger.
GATEWAY_ACCESS_LOG = env_bool("GATEWAY_ACCESS_LOG", "True")
# When set, GET /metrics needs "Authorization: Bearer <this token>".
GATEWAY_METRICS_TOKEN = env_secret("GATEWAY_METRICS_TOKEN")

# CORS (FastChat's --allow-credentials/--allowed-origins/--allowed-methods/--allowed-headers)
CORS_ALLOWED_ORIGINS = env_list("CORS_ALLOWED_ORIGINS", ["*"])
CORS_ALLOWED_METHODS = env_list("CORS_ALLOWED_METHODS", ["*"])
CORS_ALLOWED_HEADERS = env_list("CORS_ALLOWED_HEADERS", ["*"])
CORS_ALLOW_CREDENTIALS = env_bool("CORS_ALLOW_CREDENTIALS")

REDIS_URL = env_str("REDIS_URL")
# Seconds to connect to Redis or wait for its answer (limits) before giving up on it.
GATEWAY_REDIS_TIMEOUT = env_float("GATEWAY_REDIS_TIMEOUT", 1.0)
# Redis unreachable: keys with limits get 503 (False, fail closed) or are served unchecked (True).
GATEWAY_LIMITS_FAIL_OPEN = env_bool("GATEWAY_LIMITS_FAIL_OPEN", "False")

# Upstream routing, failover and health (upstreams/routing.py, cooldown.py, health.py).
# Another upstream is tried at most this many times per request, all within one deadline (s).
GATEWAY_UPSTREAM_RETRIES = env_int("GATEWAY_UPSTREAM_RETRIES", 2)
GATEWAY_UPSTREAM_FAILOVER_SECONDS = env_float("GATEWAY_UPSTREAM_FAILOVER_SECONDS", 30.0)
# An upstream cools down after this many failures in a row, or when this share of its requests
# over the window failed (once there were the minimum), for the cooldown; then one trial decides.
GATEWAY_BREAKER_FAILURES = env_int("GATEWAY_BREAKER_FAILURES", 3)
GATEWAY_BREAKER_FAILURE_RATE = env_float("GATEWAY_BREAKER_FAILURE_RATE", 0.5)
GATEWAY_BREAKER_WINDOW_SECONDS = env_float("GATEWAY_BREAKER_WINDOW_SECONDS", 30.0)
GATEWAY_BREAKER_MIN_REQUESTS = env_int("GATEWAY_BREAKER_MIN_REQUESTS", 20)
GATEWAY_BREAKER_COOLDOWN_SECONDS = env_float("GATEWAY_BREAKER_COOLDOWN_SECONDS", 10.0)
# Each upstream is probed this often (s; 0: never) by one process; this many passing probes in a
# row bring an upstream that cools down back without traffic.
GATEWAY_UPSTREAM_PROBE_SECONDS = env_float("GATEWAY_UPSTREAM_PROBE_SECONDS", 10.0)
GATEWAY_UPSTREAM_PROBE_PASSES = env_int("GATEWAY_UPSTREAM_PROBE_PASSES", 2)
# Prices are read from the database at most this often per process (seconds).
GATEWAY_PRICE_CACHE_SECONDS = env_float("GATEWAY_PRICE_CACHE_SECONDS", 5.0)
# A request against a budget reserves this many completion tokens per choice when it names no
# max_tokens (docs/decisions.md#limits).
GATEWAY_BUDGET_DEFAULT_MAX_TOKENS = env_int("GATEWAY_BUDGET_DEFAULT_MAX_TOKENS", 4096)

# The admin's live view (keys/live.py): Redis across processes, in-memory for one process.
if REDIS_URL:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}}
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

REST_FRAMEWORK = {
    # The key-management API (keys/api.py): a staff user's bearer key first, so that
    # unauthenticated requests get 401 with WWW-Authenticate; then the admin's session.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "keys.authentication.APIKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Gateway key-management API",
    "DESCRIPTION": "API keys for the OpenAI endpoints: create, list, change limits, revoke, rotate, usage.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # The time made once per second (openai_api/log_format.py): the same text, a fraction of the CPU.
    "formatters": {"plain": {"class": "openai_api.log_format.Formatter",
                             "format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # httpx logs every upstream request at INFO: noise, and work on the hot path.
    "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
}

# Logging in (keys/login.py, keys/oidc.py; README "Logging in").
# Lock-out: this many failed logins of one user from one client address lock that pair out for
# the cool-off (hours). The address is the peer's: behind nginx, uvicorn has already put the
# forwarded client there, and a direct caller's own X-Forwarded-For is never read.
AXES_FAILURE_LIMIT = env_int("GATEWAY_LOGIN_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = env_float("GATEWAY_LOGIN_COOLOFF_HOURS", 0.25)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_CLIENT_IP_CALLABLE = "keys.login.client_ip"
AXES_LOCKOUT_CALLABLE = "keys.login.locked_out"
AXES_RESET_ON_SUCCESS = True
AXES_SENSITIVE_PARAMETERS = ["password", "otp_token"]
# Staff must enter a TOTP token from a confirmed device to use the admin (`manage.py totp_device`).
GATEWAY_ADMIN_OTP = env_bool("GATEWAY_ADMIN_OTP")
OTP_TOTP_ISSUER = "FastChat gateway"
OTP_ADMIN_HIDE_SENSITIVE_DATA = True  # a device's secret is shown once, by the command, never in the admin
# OpenID Connect single sign-on, on when OIDC_RP_CLIENT_ID is set; the local login stays.
OIDC_RP_CLIENT_ID = env_str("OIDC_RP_CLIENT_ID")
OIDC_RP_CLIENT_SECRET = env_secret("OIDC_RP_CLIENT_SECRET")
OIDC_RP_SIGN_ALGO = env_str("OIDC_RP_SIGN_ALGO", "RS256")
OIDC_RP_SCOPES = env_str("OIDC_RP_SCOPES", "openid email profile")
OIDC_OP_AUTHORIZATION_ENDPOINT = env_str("OIDC_OP_AUTHORIZATION_ENDPOINT")
OIDC_OP_TOKEN_ENDPOINT = env_str("OIDC_OP_TOKEN_ENDPOINT")
OIDC_OP_USER_ENDPOINT = env_str("OIDC_OP_USER_ENDPOINT")
OIDC_OP_JWKS_ENDPOINT = env_str("OIDC_OP_JWKS_ENDPOINT")
OIDC_TIMEOUT = env_float("OIDC_TIMEOUT", 10)  # seconds for each call to the provider
# The claim listing the user's groups, and which group gives which team role:
# "group=team:role,..." or a JSON object {"group": "team:role"} (keys/oidc.py).
GATEWAY_OIDC_TEAMS_CLAIM = env_str("GATEWAY_OIDC_TEAMS_CLAIM", "groups")
GATEWAY_OIDC_TEAM_ROLES = env_str("GATEWAY_OIDC_TEAM_ROLES")
# Groups whose members become staff (empty: SSO never grants staff; staff is given in the admin).
GATEWAY_OIDC_STAFF_GROUPS = env_list("GATEWAY_OIDC_STAFF_GROUPS", [])
LOGIN_REDIRECT_URL = "/console/"
LOGIN_REDIRECT_URL_FAILURE = "/console/login/"
AUTHENTICATION_BACKENDS = [
    "keys.login.LockoutBackend",  # first: refuses a locked-out user before any password check
    "django.contrib.auth.backends.ModelBackend",
    *(["keys.oidc.TeamRoleOIDCBackend"] if OIDC_RP_CLIENT_ID else []),
]

# Usage recording (keys/usage.py)
USAGE_FLUSH_SECONDS = env_float("USAGE_FLUSH_SECONDS", 0.5)
USAGE_BATCH_SIZE = env_int("USAGE_BATCH_SIZE", 500)
# Rows queued per process at most (a minute at 2,000 requests/s, ~300 bytes each); beyond it the
# oldest are dropped and counted (gateway_usage_rows_dropped_total).
USAGE_MAX_PENDING = env_int("USAGE_MAX_PENDING", 120_000)
# Tests write usage on their own thread (the test database lives in one transaction).
USAGE_WRITER_THREAD = env_bool("USAGE_WRITER_THREAD", "True")
USAGE_RETENTION_DAYS = env_int("USAGE_RETENTION_DAYS", 90)
# Stored /v1/responses responses older than this are pruned with the usage rows (0: kept).
RESPONSES_RETENTION_DAYS = env_int("RESPONSES_RETENTION_DAYS", 30)
