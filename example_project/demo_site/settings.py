"""Settings of the example project.

SQLite at ``example_project/db.sqlite3`` by default (``DEMO_SQLITE_PATH`` moves it), so the
demo runs with no setup. ``DATABASE_URL`` switches to a server::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
    DATABASE_URL=mysql://root@127.0.0.1:3306/test        (or mariadb://...)
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

# Example project only: never deploy with this key or with DEBUG on.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-machine-memory-example-only")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "machine_memory",
    "workflows",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "demo_site.urls"
WSGI_APPLICATION = "demo_site.wsgi.application"

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

# -- database ---------------------------------------------------------------------------

URL_ENGINES = {
    "postgres": "django.db.backends.postgresql",
    "postgresql": "django.db.backends.postgresql",
    "mysql": "django.db.backends.mysql",
    "mariadb": "django.db.backends.mysql",
}


def database_from_url(url: str) -> dict[str, Any]:
    """A ``DATABASES`` entry from ``scheme://user:password@host:port/name?option=value``.

    Parsed here with urllib rather than with dj-database-url: the four schemes the demo
    supports do not justify a dependency. Query parameters become ``OPTIONS``
    (``?sslmode=require``, ``?connect_timeout=5``).
    """
    parts = urlsplit(url)
    engine = URL_ENGINES.get(parts.scheme.lower())
    if engine is None:
        raise ImproperlyConfigured(
            f"DATABASE_URL scheme {parts.scheme!r} is not supported; use one of "
            f"{', '.join(URL_ENGINES)} (or unset DATABASE_URL for SQLite)."
        )
    name = unquote(parts.path.lstrip("/"))
    if not name:
        raise ImproperlyConfigured(
            f"DATABASE_URL must name a database, as in {parts.scheme}://user@host:port/name."
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL has an invalid port: {exc}.") from None
    # Drivers want numbers as numbers (mysqlclient rejects connect_timeout="5").
    options: dict[str, Any] = {
        key: int(value) if value.isdigit() else value for key, value in parse_qsl(parts.query)
    }
    if engine == "django.db.backends.mysql":
        # MySQL's "utf8" is 3-byte utf8mb3: machine ids and states may hold any character.
        options.setdefault("charset", "utf8mb4")
    return {
        "ENGINE": engine,
        "NAME": name,
        # urlsplit leaves percent-escapes in place: "p%40ss" is the password "p@ss".
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": "" if port is None else str(port),
        "OPTIONS": options,
    }


SQLITE_PATH = Path(os.environ.get("DEMO_SQLITE_PATH") or BASE_DIR / "db.sqlite3")

DATABASES: dict[str, dict[str, Any]] = {
    "default": (
        database_from_url(os.environ["DATABASE_URL"])
        if os.environ.get("DATABASE_URL")
        else {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SQLITE_PATH,
            # Seconds a connection waits for another process's write to finish (SQLite's
            # busy timeout) instead of failing at once with "database is locked": the demo
            # runs several worker processes against one file. WAL is switched on in
            # workflows.apps, the same way on every Django version.
            "OPTIONS": {"timeout": 20},
        }
    ),
}

# Served over HTTP (the REST API), a request must not pay for a new database connection:
# keep each thread's connection for a minute, and check it before reuse so that a server
# restart costs one failed check, not a failed request (docs/rest-api.md#serving-the-api).
DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ.get("DEMO_CONN_MAX_AGE", "60"))
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# -- caches -----------------------------------------------------------------------------

CACHES: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
}

try:
    import django_redis  # noqa: F401
except ImportError:
    pass  # the demo runs without it, on database locks
else:
    # For locks in Redis: MACHINE_MEMORY["LOCK_BACKEND"] = "redis" below, or
    # `manage.py machine_memory_bench --lock-backend redis`. MACHINE_MEMORY["REDIS_CACHE"]
    # names this alias. A database number of its own: a cache.clear() on a cache sharing
    # it would wipe the locks. Short socket timeouts, so that a Redis that stops answering
    # fails lock() within a second instead of hanging the worker.
    CACHES["machine_memory_locks"] = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ.get("DEMO_REDIS_URL", "redis://127.0.0.1:6379/1"),
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
    }

# -- machine memory ---------------------------------------------------------------------

# Every key, at its default value except REDIS_CACHE (read only with "redis" locks).
MACHINE_MEMORY = {
    # Database alias holding the state rows (and the lock rows with "database" locks).
    "DATABASE": "default",
    # Where execution locks live: "database", "redis" or a dotted path to a LockBackend.
    "LOCK_BACKEND": "database",
    # CACHES alias served by django-redis, used when LOCK_BACKEND is "redis" (see CACHES).
    "REDIS_CACHE": "machine_memory_locks",
    # Seconds a lock lives unless extended; a crashed worker's lock expires after this.
    "LOCK_TTL": 120,
    # lock(): extra attempts after a denial, and the first backoff (doubling, jittered).
    "LOCK_RETRIES": 3,
    "LOCK_BACKOFF": 0.05,
    # read(): extra attempts after a transient error, and the first backoff (doubling).
    "READ_RETRIES": 2,
    "READ_BACKOFF": 0.1,
    # Largest state document accepted by write(), as compact UTF-8 JSON.
    "MAX_STATE_BYTES": 1_048_576,
    # cleanup(): "keep" the final state (only unlock) or "delete" it.
    "CLEANUP": "keep",
    # PostgreSQL: prepare the hot statements (None: unless DISABLE_SERVER_SIDE_CURSORS).
    # DEMO_PREPARED_STATEMENTS=0 turns it off, to measure what a pooler costs.
    "PREPARED_STATEMENTS": (
        None
        if os.environ.get("DEMO_PREPARED_STATEMENTS", "") == ""
        else os.environ["DEMO_PREPARED_STATEMENTS"] == "1"
    ),
}

# -- logging ----------------------------------------------------------------------------

# The demo command maps -v to these loggers' level (-v 2: INFO, -v 3: DEBUG).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "loggers": {
        "machine_memory": {"handlers": ["console"], "level": "WARNING", "propagate": False},
        "workflows": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}

# -- the rest ---------------------------------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"

# -- REST API (only when its optional packages are installed) ----------------------------

# pip install "django-machine-memory[drf,api-schema]" adds the API at /api/machine-memory/,
# its OpenAPI schema at /api/schema/ and a Swagger UI at /api/docs/ whose assets are served
# from this project (drf-spectacular-sidecar), not from a CDN. Without them the demo runs on
# plain Django.
if find_spec("rest_framework") is not None:
    INSTALLED_APPS += ["rest_framework", "rest_framework.authtoken"]
    DEMO_TOKEN_CACHE_SECONDS = float(os.environ.get("DEMO_TOKEN_CACHE_SECONDS", "5"))
    REST_FRAMEWORK: dict[str, Any] = {
        # Token first: an anonymous request gets 401 with "WWW-Authenticate: Token" (not a
        # browser's Basic password prompt). Tokens: manage.py drf_create_token <user>.
        # Sessions serve the Swagger UI after an admin login; Basic suits curl on localhost.
        "DEFAULT_AUTHENTICATION_CLASSES": [
            # DRF's TokenAuthentication, each token remembered for a few seconds per
            # process (authentication.py): the lookup costs more than the memory's work.
            "demo_site.authentication.CachedTokenAuthentication",
            "rest_framework.authentication.SessionAuthentication",
            "rest_framework.authentication.BasicAuthentication",
        ],
    }
    if find_spec("drf_spectacular") is not None and find_spec("drf_spectacular_sidecar"):
        INSTALLED_APPS += ["drf_spectacular", "drf_spectacular_sidecar"]
        REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"] = "drf_spectacular.openapi.AutoSchema"
        SPECTACULAR_SETTINGS = {
            "TITLE": "django-machine-memory demo",
            "DESCRIPTION": "States and locks of the machine memory, with ETags and lock tokens.",
            "VERSION": "1",
            "SERVE_INCLUDE_SCHEMA": False,
            # The UI's JavaScript and CSS from this project's static files.
            "SWAGGER_UI_DIST": "SIDECAR",
            "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
            "REDOC_DIST": "SIDECAR",
        }
