"""Django settings, driven by the environment (12-factor).

With no variables set the service runs on the embedded default: SQLite under
``var/`` and kombu's filesystem broker (no servers needed). DATABASE_URL and
REDIS_URL / CELERY_BROKER_URL switch it to Postgres and Redis.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var"))


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


DEBUG = _env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY") or "insecure-dev-key-set-SECRET_KEY-in-production"
ALLOWED_HOSTS = [h for h in os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",") if h]
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o]

# HTTPS. Off by default: `make run`, `make serve` and the tests talk plain HTTP on 127.0.0.1.
# TLS=true (compose.yaml's api service) is for a site served only over HTTPS: HTTP is redirected to
# HTTPS, the session and CSRF cookies are Secure, and HSTS is sent for SECURE_HSTS_SECONDS (one hour
# unless set; raise it once HTTPS is known good). SECURE_SSL_REDIRECT, SESSION_COOKIE_SECURE and
# CSRF_COOKIE_SECURE override their part of TLS one by one. Behind a proxy that terminates TLS,
# SECURE_PROXY_SSL_HEADER is the header it sets and the value meaning HTTPS
# ("HTTP_X_FORWARDED_PROTO,https"); the proxy must overwrite that header from clients.
TLS = _env_bool("TLS", False)
SECURE_SSL_REDIRECT = _env_bool("SECURE_SSL_REDIRECT", TLS)
SESSION_COOKIE_SECURE = _env_bool("SESSION_COOKIE_SECURE", TLS)
CSRF_COOKIE_SECURE = _env_bool("CSRF_COOKIE_SECURE", TLS)
SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS") or (3600 if TLS else 0))
SECURE_HSTS_INCLUDE_SUBDOMAINS = _env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = _env_bool("SECURE_HSTS_PRELOAD", False)
# Health probes (compose's healthcheck, load balancers) ask over plain HTTP, past the proxy.
SECURE_REDIRECT_EXEMPT = [r"^api/health/$"]
_proxy_ssl_header = os.environ.get("SECURE_PROXY_SSL_HEADER", "").strip()
if _proxy_ssl_header:
    _header, _, _value = (part.strip() for part in _proxy_ssl_header.partition(","))
    if not (_header.startswith("HTTP_") and _value):
        raise ImproperlyConfigured(
            f"SECURE_PROXY_SSL_HEADER must be 'HTTP_<HEADER>,<value>', e.g. 'HTTP_X_FORWARDED_PROTO,https', "
            f"not {_proxy_ssl_header!r}"
        )
    SECURE_PROXY_SSL_HEADER = (_header, _value)


def _set_explicitly(*names: str) -> bool:
    return any(os.environ.get(name, "").strip() for name in names)


# `check --deploy` warns about each protection left off, unless a variable says off explicitly (TLS=false
# for a plain-HTTP deployment, say): then it is a decision, not an oversight.
SILENCED_SYSTEM_CHECKS = [
    check
    for check, off, names in (
        ("security.W004", not SECURE_HSTS_SECONDS, ("SECURE_HSTS_SECONDS", "TLS")),
        ("security.W005", not SECURE_HSTS_INCLUDE_SUBDOMAINS, ("SECURE_HSTS_INCLUDE_SUBDOMAINS",)),
        ("security.W008", not SECURE_SSL_REDIRECT, ("SECURE_SSL_REDIRECT", "TLS")),
        ("security.W012", not SESSION_COOKIE_SECURE, ("SESSION_COOKIE_SECURE", "TLS")),
        ("security.W016", not CSRF_COOKIE_SECURE, ("CSRF_COOKIE_SECURE", "TLS")),
        ("security.W021", not SECURE_HSTS_PRELOAD, ("SECURE_HSTS_PRELOAD",)),
    )
    if off and _set_explicitly(*names)
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "api",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "api.exception_handlers.DatabaseUnavailableMiddleware",
    "api.metrics.RequestMetricsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

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
            ],
        },
    },
]

DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=True)}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 30
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
MEDIA_URL = "/media/"
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT", VAR_DIR / "media"))
DATA_ROOTS = [Path(p).resolve() for p in os.environ.get("DATA_ROOTS", str(VAR_DIR / "data")).split(":") if p]
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FILE_UPLOAD_MAX_BYTES = int(os.environ.get("FILE_UPLOAD_MAX_BYTES", 2 * 1024**3))

LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "api.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PARSER_CLASSES": [
        "api.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "EXCEPTION_HANDLER": "api.exception_handlers.api_exception_handler",
    "DEFAULT_THROTTLE_CLASSES": ["api.throttles.WriteRateThrottle"],
}

# Per-user limits (429 with Retry-After): API writes (POST, PUT, PATCH, DELETE) per user,
# "N/s", "N/min", "N/hour" or "N/day" ("" turns the limit off), counted in CACHES (Redis when
# the broker is Redis, so every API process shares the count); and jobs a user may have queued.
API_WRITE_RATE = os.environ.get("API_WRITE_RATE", "300/min")
API_MAX_QUEUED_JOBS = int(os.environ.get("API_MAX_QUEUED_JOBS", 200))

# GET /metrics (api/metrics.py): with a token, only "Authorization: Bearer <token>"; without, loopback
# clients only. Several web processes share their request metrics through PROMETHEUS_MULTIPROC_DIR
# (an empty folder, read by prometheus_client itself).
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")

# Webhooks (api/services/webhooks.py): hosts (names) and networks (CIDRs) callback URLs may reach even
# though they resolve to loopback, private or link-local addresses (refused by default); attempts,
# the first retry delay (doubling), the request timeout, and the Celery queue that sends them
# (the painter's: short requests, never behind a long job).
WEBHOOK_ALLOWED_HOSTS = [h for h in os.environ.get("WEBHOOK_ALLOWED_HOSTS", "").split(",") if h.strip()]
WEBHOOK_ALLOWED_NETWORKS = [n for n in os.environ.get("WEBHOOK_ALLOWED_NETWORKS", "").split(",") if n.strip()]
WEBHOOK_MAX_ATTEMPTS = int(os.environ.get("WEBHOOK_MAX_ATTEMPTS", 8))
WEBHOOK_RETRY_SECONDS = float(os.environ.get("WEBHOOK_RETRY_SECONDS", 5))
WEBHOOK_TIMEOUT_SECONDS = float(os.environ.get("WEBHOOK_TIMEOUT_SECONDS", 10))
WEBHOOK_QUEUE = os.environ.get("WEBHOOK_QUEUE", "interactive")
PROMETHEUS_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")

SPECTACULAR_SETTINGS = {
    "TITLE": "Network dissection service",
    "DESCRIPTION": "What each unit of a CNN detects and what it does (Bau et al., PNAS 2020).",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {"KindEnum": "api.models.NetworkModel.Kind", "LayerKindEnum": "api.models.LAYER_KINDS"},
}

# Celery. State of a job lives in the Job row; Celery results are ignored.
_default_broker_dir = VAR_DIR / "broker"
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or os.environ.get("REDIS_URL") or "filesystem://"
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CELERY_BROKER_URL}}
else:  # the embedded default: one process's memory
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
CELERY_BROKER_FOLDER = Path(os.environ.get("CELERY_BROKER_FOLDER", _default_broker_dir))
JOB_SOFT_TIME_LIMIT = int(os.environ.get("JOB_SOFT_TIME_LIMIT", 6 * 3600))
JOB_TIME_LIMIT = JOB_SOFT_TIME_LIMIT + 300
JOB_HEARTBEAT_SECONDS = float(os.environ.get("JOB_HEARTBEAT_SECONDS", 2.0))
JOB_STALE_SECONDS = float(os.environ.get("JOB_STALE_SECONDS", 30.0))
JOB_MAX_ATTEMPTS = int(os.environ.get("JOB_MAX_ATTEMPTS", 3))
WORKER_HEARTBEAT_SECONDS = float(os.environ.get("WORKER_HEARTBEAT_SECONDS", 5.0))
WORKER_ALIVE_SECONDS = float(os.environ.get("WORKER_ALIVE_SECONDS", 20.0))
WORKER_DEVICE = os.environ.get("WORKER_DEVICE", "auto")
JOB_SHARD_SIZE = int(os.environ.get("JOB_SHARD_SIZE", 2000))
DISSECT_BATCH_SIZE = int(os.environ.get("DISSECT_BATCH_SIZE", 32))
# How long POST /api/models/{id}/paint/ waits for a worker on the "interactive" queue.
PAINT_TIMEOUT_SECONDS = float(os.environ.get("PAINT_TIMEOUT_SECONDS", 30))
UNIT_TOP_CONCEPTS = int(os.environ.get("UNIT_TOP_CONCEPTS", 5))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
WHITENOISE_USE_FINDERS = True
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
