"""Helpers shared by the test modules and the worker processes they spawn."""

from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from django.db.backends.signals import connection_created

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pytest

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


# How each server names a session, ends one, and shows it (for the fault tests).
BACKEND_ID = {"postgres": "SELECT pg_backend_pid()", "mariadb": "SELECT CONNECTION_ID()"}
KILL = {"postgres": "SELECT pg_terminate_backend(%s)", "mariadb": "KILL %s"}
ALIVE = {
    "postgres": "SELECT 1 FROM pg_stat_activity WHERE pid = %s",
    "mariadb": "SELECT 1 FROM information_schema.PROCESSLIST WHERE ID = %s",
}
WAITING_FOR_A_ROW_LOCK = {
    "postgres": "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
    "mariadb": "SELECT 1 FROM information_schema.INNODB_TRX"
    " WHERE trx_mysql_thread_id = %s AND trx_state = 'LOCK WAIT'",
}


def churning_store() -> Any:
    """An in-process state store where, each time a writer looks at an id under its row
    lock, another writer has just deleted that id's state, and creates it again before
    the writer's own create: what create-or-overwrite meets when others create and delete
    the id as fast as it tries. Counts the looks in ``looks``."""
    from machine_memory.stores.memory import InMemoryStateStore

    class ChurningStore(InMemoryStateStore):
        looks = 0

        @contextmanager
        def row_locked(self, machine_id: str) -> Iterator[int | None]:
            self.looks += 1
            self.shared.states.pop(machine_id, None)
            with super().row_locked(machine_id) as version:
                yield version

        def insert(self, machine_id: str, text: str, meta: Any, fence: Any) -> bool:
            super().insert(machine_id, '{"theirs": true}', meta, fence)
            return super().insert(machine_id, text, meta, fence)

    return ChurningStore()


def machine_memory_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The warnings (and worse) the app's loggers recorded."""
    return [
        r
        for r in caplog.records
        if r.name.startswith("machine_memory") and r.levelno >= logging.WARNING
    ]
