"""Test settings: one alias per database server, plus aliases that point at nothing.

Each run gets databases of its own (the run id is inherited by the worker processes that
the concurrency tests spawn), so runs never collide.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

RUN_ID = os.environ.setdefault("MM_TEST_RUN_ID", f"{os.getpid()}_{int(time.time())}")
TMP = Path(tempfile.gettempdir())

SECRET_KEY = "tests-only"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "machine_memory",
]
# The admin tests (tests/test_admin*.py): its apps, URLs, templates and middleware.
INSTALLED_APPS += [
    "django.contrib.admin",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
]
ROOT_URLCONF = "tests.urls"
STATIC_URL = "/static/"
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
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
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

PG_HOST = os.environ.get("MM_PG_HOST", "127.0.0.1")
MARIADB_HOST = os.environ.get("MM_MARIADB_HOST", "127.0.0.1")

DATABASES: dict[str, dict[str, Any]] = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(TMP / f"machine_memory_{RUN_ID}.sqlite3"),
        # The busy timeout (seconds) lets concurrent writers wait for each other.
        "OPTIONS": {"timeout": 20},
        "TEST": {"NAME": str(TMP / f"test_machine_memory_{RUN_ID}.sqlite3")},
    },
    "postgres": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "test",
        "USER": os.environ.get("MM_PG_USER", "postgres"),
        "HOST": PG_HOST,
        "PORT": "5432",
        "OPTIONS": {"connect_timeout": 3},
        "TEST": {"NAME": f"test_machine_memory_{RUN_ID}"},
    },
    "mariadb": {
        "ENGINE": "django.db.backends.mysql",
        "NAME": "test",
        "USER": "root",
        "PASSWORD": "",
        "HOST": MARIADB_HOST,
        "PORT": "3306",
        "OPTIONS": {"charset": "utf8mb4", "connect_timeout": 3},
        "TEST": {
            "NAME": f"test_machine_memory_{RUN_ID}",
            "CHARSET": "utf8mb4",
            "COLLATION": "utf8mb4_unicode_ci",
        },
    },
    # Aliases whose server does not answer (nothing listens on port 9), for fault tests.
    "postgres_down": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "nothing",
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": "9",
        "OPTIONS": {"connect_timeout": 2},
    },
    "mariadb_down": {
        "ENGINE": "django.db.backends.mysql",
        "NAME": "nothing",
        "USER": "root",
        "HOST": "127.0.0.1",
        "PORT": "9",
        "OPTIONS": {"connect_timeout": 1},
    },
    "sqlite_down": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": "/nonexistent/machine_memory/down.sqlite3",
    },
}

# The databases the memories are tested on. MM_TEST_DATABASES=default,postgres narrows a
# run (the CI matrix does); the rest are skipped with that reason. A name that is not one of
# these aliases ends the run at its start (tests/conftest.py), rather than testing nothing.
MEMORY_DATABASES = ["default", "postgres", "mariadb"]
SELECTED_DATABASES = [
    alias.strip()
    for alias in os.environ.get("MM_TEST_DATABASES", ",".join(MEMORY_DATABASES)).split(",")
    if alias.strip()
]
# The aliases that hold real databases (the others are created by nobody). "default" always
# does, selected or not: it holds Django's own tables (the admin tests' users and sessions),
# and Django creates every other test database after it (TEST["DEPENDENCIES"]).
REAL_DATABASES = ["default"] + [
    alias for alias in MEMORY_DATABASES if alias in SELECTED_DATABASES and alias != "default"
]
DOWN_DATABASES = {"default": "sqlite_down", "postgres": "postgres_down", "mariadb": "mariadb_down"}

# The Redis lock backend's tests use a database number of their own, flushed at the start of
# a run (tests/conftest.py); MM_REDIS_URL points them elsewhere.
REDIS_URL = os.environ.get("MM_REDIS_URL", "redis://127.0.0.1:6379/13")

CACHES: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "redis": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 2, "SOCKET_TIMEOUT": 2},
    },
    # Nothing listens on port 9: for the fault tests.
    "redis_down": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": "redis://127.0.0.1:9/0",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
    },
}

# Fault-injection aliases (tests/faultproxy.py, tests/test_fault_injection.py): the same
# servers and test databases as "postgres" and "mariadb", reached through a loopback TCP
# proxy. The fixtures in tests/conftest.py set PORT (the proxy's) and NAME (the real alias's
# test database) before first use; until then they point at nothing (port 9). They are not in
# REAL_DATABASES, so no test database is made for them.
DATABASES["postgres_proxy"] = {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": "nothing",
    "USER": DATABASES["postgres"]["USER"],
    "HOST": "127.0.0.1",
    "PORT": "9",
    # No DISABLE_SERVER_SIDE_CURSORS: that declares a pooler, behind which a failed write is
    # never settled by ending its session (docs/contract.md#poolers). The proxied fixture
    # sets MACHINE_MEMORY["PREPARED_STATEMENTS"] = False instead, so that every hot
    # statement crosses the wire as its own SQL text, which the proxy's triggers match.
    "OPTIONS": {"connect_timeout": 3},
}
DATABASES["mariadb_proxy"] = {
    "ENGINE": "django.db.backends.mysql",
    "NAME": "nothing",
    "USER": DATABASES["mariadb"]["USER"],
    "PASSWORD": "",
    "HOST": "127.0.0.1",
    "PORT": "9",
    # read_timeout: a stalled connection turns into an error (2013) after 2 s.
    "OPTIONS": {"charset": "utf8mb4", "connect_timeout": 3, "read_timeout": 2},
}
# The "default" SQLite test database (NAME set by the sqlite_short fixture) with a busy
# timeout of 0.2 s: a writer blocked by another connection's write lock fails fast.
DATABASES["sqlite_short"] = {
    "ENGINE": "django.db.backends.sqlite3",
    "NAME": "/nonexistent/machine_memory/short.sqlite3",
    "OPTIONS": {"timeout": 0.2},
}
# Redis locks for the fault tests, in a database of their own: REDIS_URL's database is
# flushed when a test run starts, which would wipe the fencing tokens of a fault test running
# at the same time in another run. Nothing needs flushing here: every test uses fresh ids.
REDIS_FAULTS_URL = os.environ.get("MM_REDIS_FAULTS_URL", REDIS_URL.rsplit("/", 1)[0] + "/12")
CACHES["redis_faults"] = {
    "BACKEND": "django_redis.cache.RedisCache",
    "LOCATION": REDIS_FAULTS_URL,
    "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
}
# The same Redis database through the proxy (LOCATION set by the redis_proxy fixture).
CACHES["redis_proxy"] = {
    "BACKEND": "django_redis.cache.RedisCache",
    "LOCATION": "redis://127.0.0.1:9/0",
    "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
}
