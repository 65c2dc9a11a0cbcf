"""PostgreSQL: the hot statements are prepared server-side, unless a pooler may be in the way.

What is prepared is read from ``pg_prepared_statements`` of the very session that ran the
statements (Django's cursor on the same connection), never from the code's own flags.
docs/contract.md#poolers: session state such as prepared statements is off where the alias sets
``DISABLE_SERVER_SIDE_CURSORS`` or ``MACHINE_MEMORY["PREPARED_STATEMENTS"]`` says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from django.db import connections
from django.test import override_settings

from machine_memory import MachineMemory
from machine_memory.models import MachineLock, MachineState
from tests.support import new_id

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.parametrize("alias", ["postgres"], indirect=True)

# The start of each hot statement of the cycle, as the PostgreSQL dialect writes it.
HOT_STATEMENTS = {
    "lock": "INSERT INTO machine_memory_lock AS l",
    "read": "SELECT state, version, execution_status",
    "create": "INSERT INTO machine_memory_state",
    "update": "UPDATE machine_memory_state SET",
    "unlock": "UPDATE machine_memory_lock SET expires_at",
}


def prepared(alias: str) -> list[str]:
    """The statements prepared in the session of this thread's connection to ``alias``."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements ORDER BY prepare_time")
        return [row[0] for row in cursor.fetchall()]


def cycles(alias: str, rounds: int = 3) -> str:
    """The Arvo cycle a few times on one id (a create, then updates); the id."""
    memory = MachineMemory(using=alias)
    machine_id = new_id("prepared")
    try:
        for number in range(rounds):
            assert memory.lock(machine_id)
            state = memory.read(machine_id)
            memory.write(machine_id, {"n": number}, state)
            assert memory.unlock(machine_id)
        assert memory.read(machine_id) == {"n": rounds - 1}
    finally:
        memory.close()
    return machine_id


def hot_statements_in(statements: list[str]) -> set[str]:
    return {
        name
        for name, start in HOT_STATEMENTS.items()
        if any(text.startswith(start) for text in statements)
    }


@pytest.fixture
def fresh(alias: str) -> Iterator[str]:
    """A new session for the test (the memory's cursor is made per driver connection)."""
    connections[alias].close()
    yield alias
    connections[alias].close()


@pytest.mark.parametrize(
    ("setting", "disable_server_side_cursors", "prepares"),
    [
        pytest.param(None, False, True, id="default"),
        pytest.param(False, False, False, id="setting-off"),
        pytest.param(None, True, False, id="pooler-declared"),
        pytest.param(True, True, True, id="setting-on-overrides-pooler"),
        pytest.param(True, False, True, id="setting-on"),
        pytest.param(False, True, False, id="both-off"),
    ],
)
def test_hot_statements_are_prepared_only_where_allowed(
    fresh: str,
    monkeypatch: pytest.MonkeyPatch,
    setting: bool | None,
    disable_server_side_cursors: bool,
    prepares: bool,
) -> None:
    connection = connections[fresh]
    original = dict(connection.settings_dict)
    config: dict[str, Any] = {} if setting is None else {"PREPARED_STATEMENTS": setting}
    with monkeypatch.context() as patch, override_settings(MACHINE_MEMORY=config):
        patch.setitem(
            connection.settings_dict, "DISABLE_SERVER_SIDE_CURSORS", disable_server_side_cursors
        )
        cycles(fresh)
        statements = prepared(fresh)
        connection.close()
    assert connection.settings_dict == original
    if prepares:
        assert hot_statements_in(statements) == set(HOT_STATEMENTS), statements
        # Prepared once each (by name), not once per call.
        assert len(statements) == len(set(statements))
    else:
        # Nothing at all in the session: Django's own statements are never prepared either.
        assert statements == []


@pytest.mark.parametrize(
    "server_side_binding", [False, True], ids=["client-binding", "server-binding"]
)
def test_django_queries_on_the_same_connection_are_not_prepared(
    fresh: str, monkeypatch: pytest.MonkeyPatch, server_side_binding: bool
) -> None:
    connection = connections[fresh]
    options = {**connection.settings_dict["OPTIONS"], "server_side_binding": server_side_binding}
    # Django's server-binding cursor (OPTIONS["server_side_binding"]) is the one psycopg
    # would prepare for, once a statement reaches the connection's prepare_threshold.
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", options)
    machine_id = cycles(fresh)
    before = prepared(fresh)
    assert hot_statements_in(before) == set(HOT_STATEMENTS)
    # Well past psycopg's default threshold (5), on the connection whose threshold the
    # memory has lifted from Django's None to let its own statements prepare.
    query = "SELECT version FROM machine_memory_state WHERE machine_id = %s"
    for _ in range(10):
        assert MachineState.objects.using(fresh).filter(pk=machine_id).exists()
        assert MachineLock.objects.using(fresh).filter(pk=machine_id).exists()
        with connection.cursor() as cursor:
            cursor.execute(query, [machine_id])
            assert cursor.fetchone() == (3,)
    after = prepared(fresh)
    assert after == before
    # Django quotes table names; the memory's statements do not.
    assert not [text for text in after if '"machine_memory_' in text]
    assert not [text for text in after if text.startswith("SELECT version FROM")]
