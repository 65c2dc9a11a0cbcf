"""Faults injected for real: servers that do not answer, connections killed by the server.

Every raised error must mean that nothing was changed, and a write whose outcome the client
never heard must be settled on a fresh connection (docs/contract.md#when-the-connection-dies).
Attempts are counted where the network sees them, through ``tests/faultproxy.py``; the
faults at precise moments of a statement (before it, during a row-lock wait, after its
commit) are in ``tests/test_fault_injection.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, cast

import pytest
from django.conf import settings
from django.db import DatabaseError, OperationalError, connections, transaction

from machine_memory import MachineMemory
from machine_memory.connection import cursor_for, noted_session
from machine_memory.exceptions import (
    LockError,
    ReadError,
    WriteConflict,
    WriteError,
    WriteOutcomeUnknown,
)
from machine_memory.models import MachineState
from machine_memory.sql import dialect_for
from tests.support import ALIVE, BACKEND_ID, KILL, WAITING_FOR_A_ROW_LOCK, machine_memory_warnings
from tests.workers import ThreadRun, in_thread

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from machine_memory.locks.database import DatabaseLockBackend
    from tests.conftest import ProxiedDatabase

SERVERS = pytest.mark.parametrize("alias", ["postgres", "mariadb"], indirect=True)
# read gives up within this many seconds, whatever READ_RETRIES says (the contract).
READ_DEADLINE = 1.0


def vendor_of(alias: str) -> str:
    return "postgres" if connections[alias].vendor == "postgresql" else "mariadb"


def backend_id(alias: str) -> int:
    """The server's id of this thread's connection to ``alias`` (opening it if needed)."""
    with connections[alias].cursor() as cursor:
        cursor.execute(BACKEND_ID[vendor_of(alias)])
        return int(cursor.fetchone()[0])


def wait_for(alias: str, sql: str, backend: int, present: bool) -> None:
    """From another connection, poll until ``sql`` finds ``backend`` (or no longer does)."""
    # InnoDB refreshes INNODB_TRX only when nobody has read it for 0.1 s: poll slower there.
    interval = 0.15 if "INNODB_TRX" in sql else 0.01

    def poll() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with connections[alias].cursor() as cursor:
                cursor.execute(sql, [backend])
                if (cursor.fetchone() is not None) == present:
                    return
            time.sleep(interval)
        raise AssertionError(f"{alias} session {backend}: {sql} never became {present}")

    in_thread(poll)


def kill(alias: str, backend: int) -> None:
    """End a session from another connection, the way an operator or a failover would."""
    real = vendor_of(alias)

    def end() -> None:
        with connections[real].cursor() as cursor:
            cursor.execute(KILL[real], [backend])

    in_thread(end)
    wait_for(real, ALIVE[real], backend, present=False)


def kill_this_threads_connection(alias: str) -> None:
    kill(alias, backend_id(alias))


def read_elsewhere(alias: str, mid: str) -> dict[str, Any] | None:
    return in_thread(lambda: MachineMemory(using=alias).read(mid))


@pytest.fixture
def down(alias: str) -> MachineMemory:
    """A memory on an alias of the same vendor whose server does not answer."""
    return MachineMemory(using=settings.DOWN_DATABASES[alias])


@pytest.fixture
def refusing(proxied: ProxiedDatabase) -> ProxiedDatabase:
    """A server whose every new connection is reset at once; attempts counted by the proxy."""
    proxied.proxy.refuse()
    return proxied


# -- a server that does not answer -----------------------------------------------------------


def test_read_retries_then_raises_within_a_second(down: MachineMemory, mid: str) -> None:
    started = time.monotonic()
    with pytest.raises(ReadError) as raised:
        down.read(mid)
    elapsed = time.monotonic() - started
    assert elapsed < READ_DEADLINE
    assert elapsed >= down.read_backoff  # it did wait to retry (counted in the next test)
    assert isinstance(raised.value.__cause__, DatabaseError)
    assert f"Reading machine {mid!r} failed" in str(raised.value)  # says which, and why


def test_async_read_retries_then_raises_within_a_second(down: MachineMemory, mid: str) -> None:
    started = time.monotonic()
    with pytest.raises(ReadError):
        asyncio.run(down.aread(mid))
    assert time.monotonic() - started < READ_DEADLINE


@pytest.mark.parametrize("asynchronous", [False, True], ids=["read", "aread"])
def test_read_of_a_refusing_server_makes_each_attempt_on_a_new_connection(
    refusing: ProxiedDatabase, mid: str, asynchronous: bool
) -> None:
    memory = MachineMemory(using=refusing.alias)
    assert memory.read_retries == 2
    read: Callable[[], Any] = (
        (lambda: asyncio.run(memory.aread(mid))) if asynchronous else (lambda: memory.read(mid))
    )
    started = time.monotonic()
    with pytest.raises(ReadError):
        read()
    assert time.monotonic() - started < READ_DEADLINE
    if not asynchronous:  # aread's thread may hold a connection older than this proxy
        assert refusing.proxy.refused == memory.read_retries + 1


def test_read_stops_retrying_at_its_deadline(refusing: ProxiedDatabase, mid: str) -> None:
    # Backing off from 0.2 s: the attempts start at about 0, 0.2 and 0.6 s; the next pause
    # (0.8 s) would start the fourth attempt past the one-second deadline, so there is none,
    # however many retries are allowed.
    memory = MachineMemory(using=refusing.alias, read_retries=10, read_backoff=0.2)
    with pytest.raises(ReadError):
        memory.read(mid)
    assert refusing.proxy.refused == 3


def test_write_raises_write_error_after_a_single_attempt(down: MachineMemory, mid: str) -> None:
    with pytest.raises(WriteError) as raised:
        down.write(mid, {"n": 1}, None)
    assert not isinstance(raised.value, WriteConflict)
    assert isinstance(raised.value.__cause__, DatabaseError)
    # An update from a plain dict must first compare it with the stored state: same error,
    # and the same for a delete.
    changes: list[Callable[[], None]] = [
        lambda: down.write(mid, {"n": 2}, {"n": 1}),
        lambda: down.delete(mid, {"n": 1}),
    ]
    for change in changes:
        with pytest.raises(WriteError) as raised:
            change()
        assert not isinstance(raised.value, WriteConflict)
        assert str(raised.value) == f"Writing machine {mid!r} failed: {raised.value.__cause__}"


def test_overwrite_of_a_server_that_does_not_answer_stored_nothing(
    down: MachineMemory, mid: str
) -> None:
    with pytest.raises(WriteError) as raised:
        down.overwrite(mid, {"n": 1})
    cause = raised.value.__cause__
    assert isinstance(cause, DatabaseError)
    assert str(raised.value) == f"Could not overwrite machine {mid!r}: {cause}. Nothing was stored."


def assert_not_sent(error: WriteError, verb: str, mid: str) -> None:
    """The message of a change that never reached the storage: what, which, and that nothing
    was stored (with the driver's words in between)."""
    assert isinstance(error.__cause__, DatabaseError)
    assert str(error) == (
        f"{verb} machine {mid!r} failed: the storage could not be reached ({error.__cause__}). "
        "Nothing was stored."
    )


def test_write_that_never_connected_is_a_write_error_after_one_attempt(
    refusing: ProxiedDatabase, mid: str
) -> None:
    """Nothing was sent, so nothing can have landed: WriteError, not WriteOutcomeUnknown,
    and no second connection to check."""
    memory = MachineMemory(using=refusing.alias)
    with pytest.raises(WriteError) as raised:
        memory.write(mid, {"n": 1}, None)
    assert not isinstance(raised.value, WriteConflict)
    assert refusing.proxy.refused == 1
    assert_not_sent(raised.value, "Writing", mid)
    with pytest.raises(WriteError):
        memory.write(mid, {"n": 2}, {"n": 1})  # the compare read fails first
    assert refusing.proxy.refused == 2


def test_delete_that_never_connected_is_a_write_error(refusing: ProxiedDatabase, mid: str) -> None:
    """A delete of a state read before the server went away: nothing sent, nothing deleted."""
    memory = MachineMemory(using=refusing.alias)
    refusing.proxy.pass_through()
    memory.write(mid, {"n": 1}, None)
    state = memory.read(mid)
    connections[refusing.alias].close()
    refusing.proxy.refuse()
    with pytest.raises(WriteError) as raised:
        memory.delete(mid, state)
    assert not isinstance(raised.value, WriteConflict)
    assert_not_sent(raised.value, "Deleting", mid)
    assert read_elsewhere(refusing.real, mid) == {"n": 1}


@pytest.mark.parametrize("call", ["lock", "lock_and_read"])
def test_lock_raises_lock_error_not_false(
    down: MachineMemory, mid: str, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="machine_memory"),
        pytest.raises(LockError) as raised,
    ):
        getattr(down, call)(mid)
    cause = raised.value.__cause__
    assert isinstance(cause, DatabaseError)
    assert str(raised.value) == f"Locking machine {mid!r} failed: {cause}"
    assert not down.holds(mid)
    # The attempt may have landed before the connection died: released on a fresh
    # connection, and when that fails too, said so (the TTL frees the id then).
    assert [r.getMessage() for r in machine_memory_warnings(caplog)] == [
        f"Could not release {mid!r} after a failed lock()."
    ]


def test_unlock_returns_false_and_warns(
    down: MachineMemory, mid: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="machine_memory"):
        assert down.unlock(mid) is False
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.exc_info is None
    cause = warning.args[-1] if isinstance(warning.args, tuple) else None
    assert isinstance(cause, DatabaseError)
    assert warning.getMessage() == (
        f"Unlocking machine {mid!r} failed; leaving it to expire: {cause}"
    )


def test_lock_info_raises_lock_error(down: MachineMemory, mid: str) -> None:
    with pytest.raises(LockError) as raised:
        down.lock_info(mid)
    assert str(raised.value) == f"Reading the lock on {mid!r} failed: {raised.value.__cause__}"


# -- a connection killed by the server -------------------------------------------------------


def test_read_after_a_kill_retries_on_a_fresh_connection(
    proxied: ProxiedDatabase, mid: str
) -> None:
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 1}, None)
    before = backend_id(proxied.alias)
    connected = proxied.proxy.accepted
    kill(proxied.alias, before)
    assert memory.read(mid) == {"n": 1}
    assert proxied.proxy.accepted == connected + 1  # the killed connection, then a new one
    assert backend_id(proxied.alias) != before


@SERVERS
def test_lock_extend_unlock_after_kills(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    other = MachineMemory(using=alias, lock_retries=0)

    # lock() and extend() look once more on a fresh connection: a stale one costs nothing.
    kill_this_threads_connection(alias)
    assert memory.lock(mid) is True
    info = other.lock_info(mid)
    assert info is not None and info.owner == memory.owner

    kill_this_threads_connection(alias)
    assert memory.extend(mid, ttl=600) is True
    after = other.lock_info(mid)
    assert after is not None and after.token == info.token and after.expires_at > info.expires_at

    kill_this_threads_connection(alias)
    # unlock retries on a fresh connection: released, no exception.
    assert memory.unlock(mid) is True
    assert other.lock_info(mid) is None
    assert other.lock(mid)
    assert other.unlock(mid)


@SERVERS
@pytest.mark.parametrize("locked", [False, True], ids=["unlocked", "locked"])
def test_write_after_a_kill_reports_what_it_stored(alias: str, mid: str, locked: bool) -> None:
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 0}, None)
    prev = memory.read(mid)
    if locked:
        assert memory.lock(mid)
    kill_this_threads_connection(alias)
    failure: WriteError | None = None
    try:
        memory.write(mid, {"n": 1}, prev)
    except WriteError as exc:
        failure = exc
    if failure is not None:
        # Reported as failed: then nothing was stored ...
        assert not isinstance(failure, WriteConflict)
        assert read_elsewhere(alias, mid) == {"n": 0}
        # ... and the redelivered event goes through on a new connection.
        memory.write(mid, {"n": 1}, prev)
    assert read_elsewhere(alias, mid) == {"n": 1}
    if locked:
        assert memory.unlock(mid)


@SERVERS
def test_connection_killed_mid_statement_stores_nothing(alias: str, mid: str) -> None:
    """The write is on the wire, waiting for a row lock, when the server ends its session."""
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 0}, None)
    prev = memory.read(mid)
    writer_id: list[int] = []
    ready = threading.Event()

    def writer() -> Exception | None:
        writer_id.append(backend_id(alias))
        ready.set()
        try:
            memory.write(mid, {"n": 1}, prev)
        except WriteError as exc:
            return exc
        return None

    # Hold the state row under a row lock, so that the writer's UPDATE waits on the server.
    with transaction.atomic(using=alias):
        MachineState.objects.using(alias).select_for_update().get(machine_id=mid)
        run = ThreadRun(writer)
        assert ready.wait(10)
        wait_for(alias, WAITING_FOR_A_ROW_LOCK[alias], writer_id[0], present=True)
        kill(alias, writer_id[0])
    outcome = run.result()
    assert isinstance(outcome, WriteError) and not isinstance(outcome, WriteConflict)
    assert isinstance(outcome.__cause__, OperationalError)
    assert (
        str(outcome) == f"Writing machine {mid!r} failed: {outcome.__cause__}. Nothing was stored."
    )
    assert read_elsewhere(alias, mid) == {"n": 0}
    # Nothing half-done either: the version is unchanged, so the redelivered event succeeds.
    memory.write(mid, {"n": 1}, prev)
    assert read_elsewhere(alias, mid) == {"n": 1}


# -- a statement the database refuses --------------------------------------------------------


@contextmanager
def schema_changed(alias: str, add: list[str], drop: list[str]) -> Iterator[None]:
    """Run the statements ``add`` for the block, then ``drop``."""
    with connections[alias].cursor() as cursor:
        for sql in add:
            cursor.execute(sql)
    try:
        yield
    finally:
        with connections[alias].cursor() as cursor:
            for sql in drop:
                cursor.execute(sql)


@contextmanager
def refused_from_version(
    alias: str, machine_id: str, version: int, *, signal: bool = False
) -> Iterator[None]:
    """The database refuses every row of ``machine_id`` at ``version`` or later.

    Real errors of the database, added by the test and dropped after it, of kinds that no
    retry or fresh connection cures: a CHECK constraint on PostgreSQL and MariaDB, or with
    ``signal`` on MariaDB a trigger that SIGNALs; on SQLite, which cannot add a constraint to
    a table, a trigger that aborts. mysqlclient files a failed CHECK (4025) and a SIGNAL
    (1644) as OperationalError, the class of connection failures: the MariaDB dialect must
    file them as Django does (MySQLDialect.errors).
    """
    assert re.fullmatch(r"[\w-]+", machine_id)  # spelt into the DDL below
    name = f"mm_refuse_{uuid.uuid4().hex[:12]}"
    vendor = connections[alias].vendor
    events = ("INSERT", "UPDATE")
    if vendor == "sqlite" or (vendor == "mysql" and signal):
        refused = f"NEW.machine_id = '{machine_id}' AND NEW.version >= {version}"
        if vendor == "sqlite":
            add = [
                f"CREATE TRIGGER {name}_{event} BEFORE {event} ON machine_memory_state"
                f" WHEN {refused} BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                for event in events
            ]
        else:
            add = [
                f"CREATE TRIGGER {name}_{event} BEFORE {event} ON machine_memory_state"
                f" FOR EACH ROW BEGIN IF {refused} THEN"
                " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by the test'; END IF; END"
                for event in events
            ]
        drop = [f"DROP TRIGGER {name}_{event}" for event in events]
    else:
        refused = f"machine_id = '{machine_id}' AND version >= {version}"
        add = [f"ALTER TABLE machine_memory_state ADD CONSTRAINT {name} CHECK (NOT ({refused}))"]
        drop = [f"ALTER TABLE machine_memory_state DROP CONSTRAINT {name}"]
    with schema_changed(alias, add, drop):
        yield


@pytest.mark.parametrize("how", ["create", "update", "update-locked", "session"])
def test_write_refused_by_the_database_raises_write_error_and_stores_nothing(
    alias: str, mid: str, how: str
) -> None:
    # Only connection failures are retried or settled; any other database error must
    # reach the caller as a WriteError (docs/semantics.md), never pass for a stored write.
    memory = MachineMemory(using=alias)
    prev = None
    if how != "create":
        memory.write(mid, {"n": 0}, None)
        prev = memory.read(mid)
    if how == "update-locked":
        assert memory.lock(mid)

    def write() -> None:
        if how == "session":
            with memory.session(mid) as session:
                session.write({"n": 1})
        else:
            memory.write(mid, {"n": 1}, prev)

    # On MariaDB the updates are refused by a CHECK, the creates by a trigger's SIGNAL: the
    # create is an INSERT IGNORE, which turns a failed CHECK into a skipped row (a WriteError
    # then too, but without the database's error to show).
    signal = how in ("create", "session")
    with refused_from_version(alias, mid, 1 if prev is None else 2, signal=signal):
        with pytest.raises(WriteError) as raised:
            write()
        # Not a lost race (the version was right), not an outcome to find out: refused.
        assert type(raised.value) is WriteError
        cause = raised.value.__cause__
        assert isinstance(cause, DatabaseError)
        assert not isinstance(cause, OperationalError)
        assert str(raised.value) == f"Writing machine {mid!r} failed: {cause}"
        assert read_elsewhere(alias, mid) == prev
        assert not MachineState.objects.using(alias).filter(pk=mid, version__gt=1).exists()
    if how == "session":
        assert memory.lock_info(mid) is None  # released when the session's block ended
    # Nothing half-done: once the database accepts it, the same write goes through.
    write()
    assert read_elsewhere(alias, mid) == {"n": 1}
    if how == "update-locked":
        assert memory.unlock(mid)


@contextmanager
def deletes_refused(alias: str, machine_id: str) -> Iterator[None]:
    """The database refuses to delete the state of ``machine_id``: a trigger that raises,
    added by the test and dropped after it."""
    assert re.fullmatch(r"[\w-]+", machine_id)  # spelt into the DDL below
    name = f"mm_keep_{uuid.uuid4().hex[:12]}"
    vendor = connections[alias].vendor
    refused = f"OLD.machine_id = '{machine_id}'"
    if vendor == "sqlite":
        add = [
            f"CREATE TRIGGER {name} BEFORE DELETE ON machine_memory_state WHEN {refused}"
            " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        ]
        drop = [f"DROP TRIGGER {name}"]
    elif vendor == "mysql":
        add = [
            f"CREATE TRIGGER {name} BEFORE DELETE ON machine_memory_state FOR EACH ROW BEGIN"
            f" IF {refused} THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by the"
            " test'; END IF; END"
        ]
        drop = [f"DROP TRIGGER {name}"]
    else:
        add = [
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF {refused}"
            " THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN OLD; END $$",
            f"CREATE TRIGGER {name} BEFORE DELETE ON machine_memory_state FOR EACH ROW"
            f" EXECUTE FUNCTION {name}()",
        ]
        drop = [f"DROP TRIGGER {name} ON machine_memory_state", f"DROP FUNCTION {name}()"]
    with schema_changed(alias, add, drop):
        yield


@pytest.mark.parametrize("how", ["prev_data", "any-version"])
def test_delete_refused_by_the_database_raises_write_error_and_keeps_the_state(
    alias: str, mid: str, how: str
) -> None:
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 0}, None)
    prev = memory.read(mid)
    with deletes_refused(alias, mid), pytest.raises(WriteError) as raised:
        memory.delete(mid, prev if how == "prev_data" else None)
    assert type(raised.value) is WriteError
    cause = raised.value.__cause__
    assert isinstance(cause, DatabaseError)
    assert not isinstance(cause, OperationalError)
    assert str(raised.value) == (
        f"Deleting machine {mid!r} failed: {cause}"
        if how == "prev_data"
        else f"Could not delete machine {mid!r}: {cause}"
    )
    assert read_elsewhere(alias, mid) == {"n": 0}
    memory.delete(mid, prev)  # nothing half-done: the redelivered event goes through
    assert read_elsewhere(alias, mid) is None


@pytest.mark.parametrize("alias", ["mariadb"], indirect=True)
def test_create_skipped_by_a_failed_check_raises_write_error(alias: str, mid: str) -> None:
    """MariaDB's create is an INSERT IGNORE: a CHECK it fails skips the row without an error.
    No row and no conflict is still a refusal, said as such (not a WriteConflict)."""
    memory = MachineMemory(using=alias)
    with refused_from_version(alias, mid, 1), pytest.raises(WriteError) as raised:
        memory.write(mid, {"n": 1}, None)
    assert type(raised.value) is WriteError
    assert str(raised.value) == (
        f"Creating machine {mid!r} was refused by the database although no state exists; "
        "nothing was stored."
    )
    assert read_elsewhere(alias, mid) is None


# -- a write whose reply was lost ------------------------------------------------------------
# Landed and not landed, create and update, locked or not: test_fault_injection.py cuts the
# connection before the statement and after its commit. What remains here: a statement that
# ran but matched nothing.


def test_write_rejected_before_its_reply_was_lost_raises(
    proxied: ProxiedDatabase, mid: str
) -> None:
    """The statement ran but matched nothing (stale prev_data); then the reply was lost.

    The row shows another writer's content at the version ours would have made, so ours
    definitely did not land: a WriteError (not a conflict, not unknown), state untouched.
    """
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 0}, None)
    stale = memory.read(mid)
    memory.write(mid, {"n": 1}, memory.read(mid))
    sent = proxied.proxy.watch(b"UPDATE machine_memory_state")
    trigger = proxied.proxy.cut_after_reply(b"UPDATE machine_memory_state", keep_upstream=True)
    with pytest.raises(WriteError) as raised:
        memory.write(mid, {"n": 2}, stale)
    assert trigger.count == 1 and sent.count == 1  # it ran, once
    assert not isinstance(raised.value, WriteConflict)
    assert not isinstance(raised.value, WriteOutcomeUnknown)
    cause = raised.value.__cause__
    assert isinstance(cause, OperationalError | DatabaseError)
    assert str(raised.value) == f"Writing machine {mid!r} failed: {cause}. Nothing was stored."
    assert read_elsewhere(proxied.real, mid) == {"n": 1}


# -- ending a lost session (Dialect.end_session) ---------------------------------------------


def test_end_session_ends_another_session_and_waits_until_it_is_gone(alias: str) -> None:
    """What the memory does before it looks whether a write whose connection died landed
    (docs/contract.md#when-the-connection-dies): end that server session, and say so only
    once the server no longer lists it."""
    connection = connections[alias]
    dialect = dialect_for(connection)
    victim = connections.create_connection(alias)
    try:
        victim.ensure_connection()
        with dialect.errors(connection):
            cursor = cursor_for(connection)
            session = dialect.session_id(victim.connection)
            own = dialect.session_id(connection.connection)
            if session is None:  # SQLite: no server sessions, nothing to end
                assert connection.vendor == "sqlite" and own is None
                assert dialect.end_session(cursor, 12345, 1.0) is True
                return
            assert own is not None and session != own
            assert dialect.end_session(cursor, session, 10.0) is True
            # Gone, not only signalled: listed no more the moment end_session returns.
            cursor.execute(ALIVE[vendor_of(alias)], (session,))
            assert cursor.fetchone() is None
            # A new connection may get the id of the one it replaces: "ending" it is then a
            # no-op that reports the old session gone, never a suicide.
            assert dialect.end_session(cursor, own, 10.0) is True
            cursor.execute("SELECT 1")
            assert tuple(cursor.fetchone() or ()) == (1,)
    finally:
        victim.close()


@pytest.mark.parametrize("alias", ["postgres"], indirect=True)
def test_end_session_says_so_when_a_session_outlives_its_deadline(alias: str) -> None:
    """A session still listed at the deadline is reported not ended (the memory then cannot
    promise that nothing was stored). Staged with a server process that no client may end:
    PostgreSQL's checkpointer, listed in pg_stat_activity, which pg_terminate_backend
    refuses with a warning and leaves running."""
    connection = connections[alias]
    dialect = dialect_for(connection)
    with dialect.errors(connection):
        cursor = cursor_for(connection)
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")
        (checkpointer,) = cursor.fetchone()
        started = time.monotonic()
        assert dialect.end_session(cursor, checkpointer, 0.05) is False
        assert 0.05 <= time.monotonic() - started < 5  # looked until the deadline, then gave up
        cursor.execute(ALIVE["postgres"], (checkpointer,))
        assert cursor.fetchone() is not None  # and it is still there


@pytest.mark.parametrize("alias", ["mariadb"], indirect=True)
@pytest.mark.parametrize("timeout", [0.05, 60.0])
def test_end_session_waits_out_a_rollback_until_its_deadline(alias: str, timeout: float) -> None:
    """KILL ends a session once the server gets to it: one with a large uncommitted write
    stays listed (as "Killed", rolling back) for as long as the rollback takes, about a
    second here. end_session waits for it until its deadline, and says whether it saw the
    session go."""
    connection = connections[alias]
    dialect = dialect_for(connection)
    table = f"machine_memory_rollback_{os.getpid()}"
    victim = connections.create_connection(alias)
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, pad CHAR(200)) ENGINE=InnoDB")
    try:
        with victim.cursor() as cursor:
            victim.set_autocommit(False)
            cursor.execute(f"INSERT INTO {table} SELECT seq, 'x' FROM seq_1_to_300000")
        session = dialect.session_id(victim.connection)
        assert session is not None
        with dialect.errors(connection):
            cursor = cursor_for(connection)
            ended = dialect.end_session(cursor, session, timeout)
            cursor.execute(ALIVE["mariadb"], (session,))
            listed = cursor.fetchone() is not None
        # Rolled back within the minute; still rolling back 50 ms after the KILL.
        assert (ended, listed) == ((True, False) if timeout > 1 else (False, True))
    finally:
        with suppress(DatabaseError):
            victim.close()
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE {table}")


def kill_the_side_connection(memory: MachineMemory, alias: str) -> int:
    """Inside atomic(): end the server session of the connection the memory's locks run on,
    which is not the caller's; the caller's session id."""
    caller = backend_id(alias)
    side = cast("DatabaseLockBackend", memory.locks)._local.connection
    side_session = noted_session(side)
    assert side_session is not None and side_session != caller
    kill(alias, side_session)
    return caller


@SERVERS
def test_an_unlock_retried_inside_atomic_replaces_only_its_own_dead_connection(
    alias: str, mid: str
) -> None:
    """Inside the caller's transaction locks run on a connection of their own. When it has
    died, unlock() retries on a new one: it releases, and the caller's connection, with its
    transaction, is left alone and commits."""
    memory = MachineMemory(using=alias)
    other = f"{mid}-b"
    with transaction.atomic(using=alias):
        memory.write(mid, {"n": 1}, None)  # the caller's uncommitted work
        assert memory.lock(other)
        caller = kill_the_side_connection(memory, alias)
        assert memory.unlock(other) is True
        assert backend_id(alias) == caller
    assert read_elsewhere(alias, mid) == {"n": 1}  # committed with the caller
    assert MachineMemory(using=alias).lock_info(other) is None
    memory.close()


@SERVERS
def test_a_lock_retried_inside_atomic_ends_only_its_own_dead_connection(
    alias: str, mid: str
) -> None:
    """Inside the caller's transaction locks run on a connection of their own. When that one
    dies, lock() looks again on a fresh one after ending the dead session: the dead side
    connection's, never the caller's, whose transaction goes on and commits."""
    memory = MachineMemory(using=alias)
    other = f"{mid}-b"
    with transaction.atomic(using=alias):
        memory.write(mid, {"n": 1}, None)  # the caller's uncommitted work
        assert memory.lock(other)
        assert memory.unlock(other)
        caller = kill_the_side_connection(memory, alias)
        assert memory.lock(other)
        assert backend_id(alias) == caller
    assert read_elsewhere(alias, mid) == {"n": 1}  # committed with the caller
    assert memory.unlock(other)
    memory.close()
