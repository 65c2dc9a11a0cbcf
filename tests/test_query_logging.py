"""The memory's statements, which run on the driver's cursor, seen by Django's tools:
``connection.queries`` under DEBUG (and ``CaptureQueriesContext``), the
``django.db.backends`` logger, and ``connection.execute_wrapper()`` (APM database spans).
Without any of them the hot path stays on the bare driver cursor."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from django.db import connections
from django.test.utils import CaptureQueriesContext, override_settings

from machine_memory import MachineMemory
from machine_memory.connection import ObservedCursor, cursor_for

if TYPE_CHECKING:
    from collections.abc import Callable

    import pytest


def cycle(memory: MachineMemory, mid: str) -> None:
    assert memory.lock(mid)
    state = memory.read(mid)
    memory.write(mid, {"n": 1}, state)
    assert memory.unlock(mid)
    with memory.session(mid) as s:
        s.write({"n": (s.state or {})["n"] + 1})


# The memory's tables, and the routines that lock + read (PostgreSQL, MariaDB) and write +
# release (MariaDB) in one statement.
OURS = (
    "machine_memory_lock",
    "machine_memory_state",
    "machine_memory_acquire_and_read",
    "machine_memory_write_and_release",
)


def tables(sql: str) -> set[str]:
    return {name for name in OURS if name in sql}


def ours(statements: list[str]) -> list[str]:
    """The memory's statements: those on its tables. The rest may only be SQLite's
    transaction control around a write + release, or Django's own connection set-up."""
    mine = [sql for sql in statements if tables(sql)]
    others = {sql.split()[0].upper() for sql in statements if not tables(sql)}
    assert others <= {"BEGIN", "COMMIT", "SET", "PRAGMA", "SELECT"}, others
    return mine


def test_captured_queries_show_every_statement(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    connection = connections[alias]
    with CaptureQueriesContext(connection) as captured:
        cycle(memory, mid)
    statements = ours([query["sql"] for query in captured.captured_queries])
    # lock, read, write, unlock, then the session's lock + read and write + release: at
    # least one statement each (a MariaDB batch shows as one).
    assert len(statements) >= 6, statements
    assert all(mid in sql for sql in statements)  # with their parameters
    assert all(float(query["time"]) >= 0 for query in captured.captured_queries)
    assert memory.read(mid) == {"n": 2}


def test_debug_logs_every_statement(alias: str, mid: str, caplog: pytest.LogCaptureFixture) -> None:
    memory = MachineMemory(using=alias)
    with (
        override_settings(DEBUG=True),
        caplog.at_level(logging.DEBUG, logger="django.db.backends"),
    ):
        assert memory.lock(mid)
        assert memory.unlock(mid)
    records = [r for r in caplog.records if r.name == "django.db.backends"]
    mine = [r for r in records if tables(getattr(r, "sql", ""))]
    assert len(mine) >= 2, [r.getMessage() for r in records]
    assert all(getattr(r, "alias", None) == alias for r in mine)
    assert all(tables(getattr(r, "sql", "")) == {"machine_memory_lock"} for r in mine)
    assert all(mid in str(getattr(r, "params", "")) for r in mine)


def test_execute_wrappers_see_every_statement(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    seen: list[tuple[str, Any]] = []

    def wrapper(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
    ) -> Any:
        assert context["connection"] is connections[alias]
        seen.append((sql, params))
        return execute(sql, params, many, context)

    with connections[alias].execute_wrapper(wrapper):
        cycle(memory, mid)
    assert len(ours([sql for sql, _ in seen])) >= 6
    assert memory.read(mid) == {"n": 2}
    seen.clear()
    memory.read(mid)  # the wrapper is gone: nothing more is seen
    assert seen == []


def test_unobserved_statements_run_on_the_bare_driver_cursor(alias: str) -> None:
    connection = connections[alias]
    with connection.wrap_database_errors:
        assert not isinstance(cursor_for(connection), ObservedCursor)
        with CaptureQueriesContext(connection):
            assert isinstance(cursor_for(connection), ObservedCursor)
