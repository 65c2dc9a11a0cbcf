"""Helpers shared by the test modules and the worker processes they spawn."""

from __future__ import annotations

import os
import uuid
from typing import Any

from django.db.backends.signals import connection_created

VENDOR_IDS = {"default": "sqlite", "postgres": "postgres", "mariadb": "mariadb"}


def sqlite_pragmas(sender: Any, connection: Any, **kwargs: Any) -> None:
    # The documented SQLite settings: WAL (readers never block the writer) and
    # synchronous=NORMAL (durable at checkpoints, safe with WAL).
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")


def enable_sqlite_pragmas() -> None:
    connection_created.connect(sqlite_pragmas, dispatch_uid="machine_memory_tests_wal")


def new_id(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def use_test_databases() -> None:
    """In a spawned worker process: point every real alias at the run's test database."""
    import django
    from django.conf import settings

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    django.setup()
    for alias in settings.REAL_DATABASES:
        db = settings.DATABASES[alias]
        db["NAME"] = db.get("TEST", {})["NAME"]
    enable_sqlite_pragmas()
