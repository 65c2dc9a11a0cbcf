"""Settings of the example project.

SQLite at ``example_project/db.sqlite3`` by default (``DEMO_SQLITE_PATH`` moves it), so the
demo runs with no setup. ``DATABASE_URL`` switches to a server::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
    DATABASE_URL=mysql://root@127.0.0.1:3306/test        (or mariadb://...)
"""

from __future__ import annotations

import os
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

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# -- machine memory ---------------------------------------------------------------------

# Every key, with its default value: delete the dict and nothing changes.
MACHINE_MEMORY = {
    # Database alias holding the state rows (and the lock rows with "database" locks).
    "DATABASE": "default",
    # Where execution locks live: "database", "redis" or a dotted path to a LockBackend.
    "LOCK_BACKEND": "database",
    # CACHES alias served by django-redis, used when LOCK_BACKEND is "redis".
    "REDIS_CACHE": "default",
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
