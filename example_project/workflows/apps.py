from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.backends.signals import connection_created


def sqlite_pragmas(sender: Any, connection: Any, **kwargs: Any) -> None:
    """Apply the SQLite settings the machine memory documents, on every new connection."""
    if connection.vendor != "sqlite":
        return
    with connection.cursor() as cursor:
        # WAL: readers never block the writer, nor the writer the readers, so the worker
        # processes only queue behind each other's writes (https://sqlite.org/wal.html).
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL is safe with WAL (a power cut may lose the last commits, never corrupt the
        # file) and saves an fsync per commit (https://sqlite.org/pragma.html#pragma_synchronous).
        cursor.execute("PRAGMA synchronous=NORMAL")


class WorkflowsConfig(AppConfig):
    name = "workflows"
    verbose_name = "Example workflows"

    def ready(self) -> None:
        # A signal rather than OPTIONS["init_command"]: that option exists for SQLite only
        # from Django 5.1, and this project must run on 4.2 too.
        connection_created.connect(sqlite_pragmas, dispatch_uid="workflows_sqlite_pragmas")
