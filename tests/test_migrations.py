"""The app's migrations on a database of their own: forwards they make every table and vendor
object the memory needs (docs/storage.md), and ``migrate machine_memory zero`` removes them
all again, so a project can drop the app without leftovers.

Each test makes a new database (a new file on SQLite) beside the test databases and drops
it at the end: the shared test databases are never migrated back.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections

from machine_memory import MachineMemory, sql

if TYPE_CHECKING:
    from collections.abc import Iterator

    from django.db.backends.base.base import BaseDatabaseWrapper

TABLES = {"machine_memory_state", "machine_memory_lock"}


@contextmanager
def new_database(alias: str) -> Iterator[str]:
    """An alias of a new, empty database on the server (or in the directory) of ``alias``."""
    connection = connections[alias]
    template = dict(connection.settings_dict)
    name = f"test_mm_migrations_{uuid.uuid4().hex[:12]}"
    if connection.vendor == "sqlite":
        # Named so that tests/conftest.py removes it at the end of the run even if this
        # test is killed before its own cleanup.
        path = settings.TMP / f"{name}_machine_memory_{settings.RUN_ID}.sqlite3"
        template["NAME"] = str(path)
    else:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        template["NAME"] = name
    fresh = f"migrations_{name}"
    connections.settings[fresh] = template
    try:
        yield fresh
    finally:
        connections[fresh].close()
        del connections[fresh]
        del connections.settings[fresh]
        if connection.vendor == "sqlite":
            for leftover in Path(template["NAME"]).parent.glob(Path(template["NAME"]).name + "*"):
                leftover.unlink()
        else:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {name}")


def vendor_objects(connection: BaseDatabaseWrapper) -> set[str]:
    """The routines, sequences and indexes of the memory's own making in this database."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT proname FROM pg_proc WHERE proname LIKE 'machine_memory%'"
                " UNION ALL SELECT relname FROM pg_class"
                " WHERE relkind = 'S' AND relname LIKE 'machine_memory%'"
            )
        elif connection.vendor == "mysql":
            cursor.execute(
                "SELECT ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA ="
                " DATABASE() UNION ALL SELECT TABLE_NAME FROM information_schema.TABLES"
                " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'SEQUENCE'"
            )
        else:
            # Not Django's own indexes of the models: the ones install() adds.
            cursor.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index'"
                " AND name LIKE 'machine_memory%high_water'"
            )
        return {str(row[0]) for row in cursor.fetchall()}


def test_migrations_make_everything_and_zero_removes_it_all(alias: str) -> None:
    with new_database(alias) as fresh:
        connection = connections[fresh]
        assert vendor_objects(connection) == set()
        call_command("migrate", "machine_memory", database=fresh, verbosity=0)
        assert set(connection.introspection.table_names()) >= TABLES
        made = vendor_objects(connection)
        expected = {
            "postgresql": {"machine_memory_acquire_and_read", "machine_memory_lock_token_seq"},
            "mysql": {
                "machine_memory_acquire_and_read",
                "machine_memory_write_and_release",
                "machine_memory_lock_token_seq",
            },
            "sqlite": {"machine_memory_lock_token_high_water"},
        }[connection.vendor]
        assert made == expected

        # What was made works: the session's routines, the token sequence or index.
        memory = MachineMemory(using=fresh)
        with memory.session("m-1") as s:
            s.write({"n": 1})
        assert memory.lock("m-1")
        assert memory.held_token("m-1") == 2
        assert memory.unlock("m-1")
        memory.close()

        call_command("migrate", "machine_memory", "zero", database=fresh, verbosity=0)
        assert not TABLES & set(connection.introspection.table_names())
        assert vendor_objects(connection) == set()

        # And forwards again from nothing: a project can add the app back.
        call_command("migrate", "machine_memory", database=fresh, verbosity=0)
        assert vendor_objects(connection) == expected
        again = MachineMemory(using=fresh)
        assert again.lock("m-1") and again.held_token("m-1") == 1
        assert again.unlock("m-1")
        again.close()
        call_command("migrate", "machine_memory", "zero", database=fresh, verbosity=0)


def test_migrating_back_to_the_first_migration_keeps_the_memory_working(alias: str) -> None:
    """Back from 0002 to 0001: the vendor objects stay (0002's reversal leaves them), and a
    memory on the 0001 schema still locks and writes."""
    with new_database(alias) as fresh:
        call_command("migrate", "machine_memory", database=fresh, verbosity=0)
        call_command("migrate", "machine_memory", "0001_initial", database=fresh, verbosity=0)
        memory = MachineMemory(using=fresh)
        with memory.session("m-1") as s:
            s.write({"n": 1})
        assert memory.read("m-1") == {"n": 1}
        memory.close()
        call_command("migrate", "machine_memory", "zero", database=fresh, verbosity=0)
        assert vendor_objects(connections[fresh]) == set()


def test_a_process_that_used_the_memory_before_it_migrates_installs_working_routines(
    alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The routines a migration installs are built from the statements a worker runs: a
    process that locked before migrating (a test suite, a long-lived shell) must install
    the same routines as one that migrates first."""
    with new_database(alias) as fresh:
        call_command("migrate", "machine_memory", database=fresh, verbosity=0)
        # A process that starts with the schema in place: its statements not built yet.
        monkeypatch.setattr(sql, "_dialects", {})
        worker = MachineMemory(using=fresh)
        assert worker.lock("m-1") and worker.unlock("m-1")
        worker.close()
        call_command("migrate", "machine_memory", "zero", database=fresh, verbosity=0)
        call_command("migrate", "machine_memory", database=fresh, verbosity=0)
        memory = MachineMemory(using=fresh)
        with memory.session("m-1") as s:
            s.write({"n": 1})
        locked = memory.lock_and_read("m-1", ttl=60)
        assert locked is not None and locked.state == {"n": 1}
        info = locked.lock_info()  # as the acquiring statement returned it
        assert info is not None and info.token == locked.token
        assert (info.expires_at - info.acquired_at).total_seconds() == pytest.approx(60)
        assert memory.unlock("m-1")
        memory.close()
        call_command("migrate", "machine_memory", "zero", database=fresh, verbosity=0)
