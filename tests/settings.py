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

# The aliases that hold real databases (the others are created by nobody).
# MM_TEST_DATABASES=default,postgres narrows a run (the CI matrix does); the rest are skipped.
REAL_DATABASES = [
    alias
    for alias in os.environ.get("MM_TEST_DATABASES", "default,postgres,mariadb").split(",")
    if alias in ("default", "postgres", "mariadb")
]
DOWN_DATABASES = {"default": "sqlite_down", "postgres": "postgres_down", "mariadb": "mariadb_down"}

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
}
