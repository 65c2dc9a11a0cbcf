"""The memory inside the caller's ``transaction.atomic()``.

Locks must never depend on the caller's commit: on PostgreSQL and MariaDB they go through a
connection of their own and are visible to other connections at once; on SQLite (one writer
at a time) they refuse with a message naming the fix. State writes join the caller's
transaction. "Another connection" is another thread: Django's connections are per thread.
"""

from __future__ import annotations

import contextlib
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import pytest
from django.contrib.auth.models import Group
from django.db import connections, transaction

from machine_memory import LockInfo, MachineMemory
from machine_memory.connection import noted_session
from machine_memory.exceptions import LockLost, MachineMemoryError, WriteError
from tests.workers import in_thread

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from machine_memory.locks.database import DatabaseLockBackend

SERVERS = pytest.mark.parametrize("alias", ["postgres", "mariadb"], indirect=True)
SQLITE = pytest.mark.parametrize("alias", ["default"], ids=["sqlite"], indirect=True)
SHORT_TTL = 0.2


class Rollback(Exception):
    """Raised to make the caller's atomic() block roll back."""


@contextmanager
def rolled_back(alias: str) -> Iterator[None]:
    """The caller's ``atomic()`` block, left by an exception (so rolled back) at its end."""
    with contextlib.suppress(Rollback), transaction.atomic(using=alias):
        yield
        raise Rollback


def seen_elsewhere(alias: str, mid: str) -> tuple[bool, LockInfo | None]:
    """From another connection: can another owner take the lock (no retries), and who holds it."""

    def probe() -> tuple[bool, LockInfo | None]:
        other = MachineMemory(using=alias, lock_retries=0)
        try:
            info = other.lock_info(mid)
            taken = other.lock(mid)
            if taken:
                assert other.unlock(mid)
        finally:
            other.close()
        return taken, info

    return in_thread(probe)


def read_elsewhere(alias: str, mid: str) -> dict[str, Any] | None:
    return in_thread(lambda: MachineMemory(using=alias).read(mid))


def take_over(alias: str, mid: str) -> MachineMemory:
    """Another owner takes the (expired) lock on another connection and keeps it; the test
    releases it at its end."""

    def steal() -> MachineMemory:
        thief = MachineMemory(using=alias, lock_retries=0)
        assert thief.lock(mid)
        return thief

    return in_thread(steal)


# -- locks inside atomic() ----------------------------------------------------------------


@SERVERS
def test_lock_inside_atomic_is_visible_at_once_and_survives_rollback(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    with rolled_back(alias):
        assert memory.lock(mid)
        taken, info = seen_elsewhere(alias, mid)
        assert not taken
        assert info is not None and info.owner == memory.owner
        token = info.token
    taken, info = seen_elsewhere(alias, mid)
    assert not taken
    assert info is not None and (info.owner, info.token) == (memory.owner, token)
    assert memory.holds(mid)
    assert memory.unlock(mid)
    assert seen_elsewhere(alias, mid) == (True, None)
    memory.close()


@SERVERS
def test_unlock_inside_atomic_is_visible_at_once_and_survives_rollback(
    alias: str, mid: str
) -> None:
    memory = MachineMemory(using=alias)
    assert memory.lock(mid)
    with rolled_back(alias):
        assert memory.unlock(mid)
        assert seen_elsewhere(alias, mid) == (True, None)
    assert memory.lock_info(mid) is None
    assert not memory.holds(mid)
    assert seen_elsewhere(alias, mid) == (True, None)
    memory.close()


@SERVERS
def test_extend_inside_atomic_is_visible_at_once_and_survives_rollback(
    alias: str, mid: str
) -> None:
    memory = MachineMemory(using=alias)
    assert memory.lock(mid, ttl=30)
    before = memory.lock_info(mid)
    assert before is not None
    with rolled_back(alias):
        assert memory.extend(mid, ttl=3600)
        taken, during = seen_elsewhere(alias, mid)
        assert not taken
        assert during is not None and during.token == before.token
        assert during.expires_at >= before.expires_at + timedelta(minutes=50)
    taken, after = seen_elsewhere(alias, mid)
    assert not taken
    assert after == during
    assert memory.unlock(mid)
    memory.close()


@SERVERS
def test_lock_cycle_inside_one_atomic_block(alias: str, mid: str) -> None:
    """The whole Arvo cycle inside the caller's transaction: lock, read, write, unlock."""
    memory = MachineMemory(using=alias)
    memory.write(mid, {"step": 0}, None)
    with transaction.atomic(using=alias):
        assert memory.lock(mid)
        state = memory.read(mid)
        memory.write(mid, {"step": 1}, state)
        assert memory.unlock(mid)
        # Released for everyone at once, while the state change is still uncommitted.
        assert seen_elsewhere(alias, mid) == (True, None)
        assert read_elsewhere(alias, mid) == {"step": 0}
    assert read_elsewhere(alias, mid) == {"step": 1}
    memory.close()


@SQLITE
def test_lock_inside_atomic_on_sqlite_names_the_fix(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    with transaction.atomic(using=alias):
        with pytest.raises(MachineMemoryError) as raised:
            memory.lock(mid)
        # What went wrong, where, and the fix: lock before entering atomic().
        assert str(raised.value) == (
            "lock(), unlock() and extend() cannot run inside transaction.atomic() (or with "
            f"autocommit off) on sqlite database {alias!r}: the lock would commit with your "
            "transaction. Take the lock before entering atomic() and release it after the "
            "block."
        )
        assert not memory.holds(mid)
    assert memory.lock_info(mid) is None
    assert seen_elsewhere(alias, mid) == (True, None)


@SQLITE
def test_unlock_and_extend_inside_atomic_on_sqlite_name_the_fix(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    assert memory.lock(mid, ttl=30)
    before = memory.lock_info(mid)
    with transaction.atomic(using=alias):
        with pytest.raises(MachineMemoryError, match="atomic"):
            memory.extend(mid, ttl=3600)
        with pytest.raises(MachineMemoryError, match="atomic"):
            memory.unlock(mid)
    # Neither took effect: the lock is still held, with its old expiry.
    assert memory.lock_info(mid) == before
    assert memory.holds(mid)
    assert memory.unlock(mid)
    assert memory.lock_info(mid) is None


# -- a transaction the caller manages itself (autocommit off) ---------------------------------


@contextmanager
def autocommit_off(alias: str) -> Iterator[None]:
    """The caller runs its own transaction (``transaction.set_autocommit(False)``), which it
    rolls back at the end: the same rules as inside ``atomic()``."""
    transaction.set_autocommit(False, using=alias)
    try:
        yield
    finally:
        transaction.rollback(using=alias)
        transaction.set_autocommit(True, using=alias)


@SERVERS
def test_lock_and_unlock_with_autocommit_off_are_visible_at_once_and_survive_rollback(
    alias: str, mid: str
) -> None:
    memory = MachineMemory(using=alias)
    with autocommit_off(alias):
        assert memory.lock(mid)
        taken, info = seen_elsewhere(alias, mid)
        assert not taken and info is not None and info.owner == memory.owner
    assert memory.lock_info(mid) == info  # the rollback took nothing back
    with autocommit_off(alias):
        assert memory.unlock(mid)
        assert seen_elsewhere(alias, mid) == (True, None)
    assert memory.lock_info(mid) is None
    memory.close()


@SERVERS
def test_session_with_autocommit_off_writes_with_the_caller_and_releases_at_once(
    alias: str, mid: str
) -> None:
    """The session's write joins the caller's transaction, as a write does, and its lock is
    released for everyone at once: no single statement may commit (or end) the caller's
    transaction, nor keep the release back until it ends."""
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 0}, None)
    with autocommit_off(alias):
        with memory.session(mid) as s:
            assert s.state == {"n": 0}
            s.write({"n": 1})
        assert seen_elsewhere(alias, mid) == (True, None)
        assert read_elsewhere(alias, mid) == {"n": 0}
    assert read_elsewhere(alias, mid) == {"n": 0}  # rolled back with the caller
    assert memory.lock_info(mid) is None
    memory.close()


@contextmanager
def autocommit_setting_off(alias: str) -> Iterator[None]:
    """``"AUTOCOMMIT": False`` in the alias's DATABASES entry (the dict every thread's
    connection shares): each statement waits for a commit of the caller's, from the first."""
    connection = connections[alias]
    saved = connection.settings_dict["AUTOCOMMIT"]
    connection.close()
    connection.settings_dict["AUTOCOMMIT"] = False
    try:
        yield
    finally:
        connection.close()  # the server rolls back what the caller left open
        connection.settings_dict["AUTOCOMMIT"] = saved


@SERVERS
def test_locks_commit_at_once_when_databases_turns_autocommit_off(alias: str, mid: str) -> None:
    """The connection of their own that locks take must commit by itself: a copy of the
    alias's settings would hold every lock in a transaction nobody commits."""
    memory = MachineMemory(using=alias)
    with autocommit_setting_off(alias):
        assert memory.lock(mid)
        taken, info = seen_elsewhere(alias, mid)
        assert not taken and info is not None and info.owner == memory.owner
        assert memory.extend(mid, ttl=timedelta(minutes=5))
        extended = seen_elsewhere(alias, mid)[1]
        assert extended is not None and extended.expires_at > info.expires_at
        assert memory.unlock(mid)
        assert seen_elsewhere(alias, mid) == (True, None)
    memory.close()


@SQLITE
def test_lock_with_autocommit_off_on_sqlite_names_the_fix(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    with autocommit_off(alias), pytest.raises(MachineMemoryError, match="autocommit off"):
        memory.lock(mid)
    assert memory.lock_info(mid) is None
    assert seen_elsewhere(alias, mid) == (True, None)


# -- writes join the caller's transaction ----------------------------------------------------


def test_write_inside_atomic_rolls_back_with_the_caller(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 1}, None)
    prev = memory.read(mid)
    with rolled_back(alias):
        memory.write(mid, {"n": 2}, prev)
        Group.objects.using(alias).create(name=mid)
        assert memory.read(mid) == {"n": 2}  # the caller's transaction sees its own write
    assert memory.read(mid) == {"n": 1}
    assert not Group.objects.using(alias).filter(name=mid).exists()
    # The event is redelivered: the same prev_data is still current, and the write goes through.
    memory.write(mid, {"n": 2}, prev)
    assert read_elsewhere(alias, mid) == {"n": 2}


def test_a_write_inside_atomic_does_not_vouch_for_its_version(alias: str, mid: str) -> None:
    """The version a write makes inside the caller's transaction may roll back, so the
    object written is not remembered at it: a write from that object later compares its
    content with the stored state, which is right whatever became of the transaction."""
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 1}, None)
    prev = memory.read(mid)
    same = {"n": 1}
    with rolled_back(alias):
        memory.write(mid, same, prev)  # version 2, until the rollback
        assert memory.version_of(mid, same) is None
    # Version 1 is stored again, and `same` equals it: a write from `same` goes through.
    memory.write(mid, {"n": 2}, same)
    assert read_elsewhere(alias, mid) == {"n": 2}


def test_create_inside_atomic_rolls_back_with_the_caller(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    with rolled_back(alias):
        memory.write(mid, {"created": True}, None)
    assert memory.read(mid) is None
    memory.write(mid, {"created": True}, None)
    assert read_elsewhere(alias, mid) == {"created": True}


def test_write_inside_atomic_commits_with_the_caller(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    with transaction.atomic(using=alias):
        memory.write(mid, {"n": 1}, None)
        Group.objects.using(alias).create(name=mid)
        # Not visible to another connection before the caller commits.
        assert read_elsewhere(alias, mid) is None
    assert read_elsewhere(alias, mid) == {"n": 1}
    assert Group.objects.using(alias).filter(name=mid).exists()
    state = memory.read(mid)
    with transaction.atomic(using=alias):
        memory.write(mid, {"n": 2}, state)
        assert read_elsewhere(alias, mid) == {"n": 1}
    assert read_elsewhere(alias, mid) == {"n": 2}


# -- fencing inside atomic() -----------------------------------------------------------------


def test_write_inside_atomic_under_a_lock_taken_before(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 0}, None)
    assert memory.lock(mid)
    with transaction.atomic(using=alias):
        state = memory.read(mid)
        memory.write(mid, {"n": 1}, state)
    assert memory.unlock(mid)
    assert read_elsewhere(alias, mid) == {"n": 1}


def test_write_inside_atomic_after_a_takeover_is_fenced(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 0}, None)
    state = memory.read(mid)
    assert memory.lock(mid, ttl=SHORT_TTL)
    time.sleep(SHORT_TTL + 0.1)
    thief = take_over(alias, mid)
    with transaction.atomic(using=alias):
        with pytest.raises(LockLost):
            memory.write(mid, {"n": 1}, state)
        # The rejection did not break the caller's transaction.
        Group.objects.using(alias).create(name=mid)
    assert Group.objects.using(alias).filter(name=mid).exists()
    assert read_elsewhere(alias, mid) == {"n": 0}
    info = memory.lock_info(mid)
    assert info is not None and info.owner == thief.owner
    assert thief.unlock(mid)


@SERVERS
def test_takeover_during_the_callers_transaction_is_fenced(alias: str, mid: str) -> None:
    """The lock is lost after the caller's transaction has already read the state."""
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 0}, None)
    assert memory.lock(mid, ttl=SHORT_TTL)
    with transaction.atomic(using=alias):
        state = memory.read(mid)
        time.sleep(SHORT_TTL + 0.1)
        thief = take_over(alias, mid)
        with pytest.raises(LockLost):
            memory.write(mid, {"n": 1}, state)
    assert read_elsewhere(alias, mid) == {"n": 0}
    info = memory.lock_info(mid)
    assert info is not None and info.owner == thief.owner
    assert thief.unlock(mid)


@SQLITE
def test_takeover_during_the_callers_transaction_on_sqlite_stores_nothing(
    alias: str, mid: str
) -> None:
    """SQLite cannot upgrade a read snapshot that another writer has since overtaken.

    The write then fails as a whole (``WriteError``) inside the caller's transaction.
    """
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 0}, None)
    assert memory.lock(mid, ttl=SHORT_TTL)
    with transaction.atomic(using=alias):
        state = memory.read(mid)
        time.sleep(SHORT_TTL + 0.1)
        thief = take_over(alias, mid)
        with pytest.raises(WriteError):
            memory.write(mid, {"n": 1}, state)
    assert read_elsewhere(alias, mid) == {"n": 0}
    assert thief.unlock(mid)


@SERVERS
def test_locks_inside_atomic_share_one_connection_which_close_ends(alias: str, mid: str) -> None:
    """The connection of its own that locks use inside the caller's transaction is made
    once per thread and reused (not one per call, which would leak server sessions), and
    close() closes it."""
    memory = MachineMemory(using=alias)
    locks = cast("DatabaseLockBackend", memory.locks)
    sessions = set()
    with transaction.atomic(using=alias):
        for n in range(3):
            assert memory.lock(f"{mid}-{n}")
            assert memory.unlock(f"{mid}-{n}")
            sessions.add(noted_session(locks._local.connection))
    assert len(sessions) == 1 and None not in sessions
    side = locks._local.connection
    assert side.connection is not None
    memory.close()
    assert side.connection is None
    assert locks._local.connection is None


# -- how a release commits (PostgreSQL) ------------------------------------------------------


@pytest.fixture
def commit_modes(alias: str) -> Iterator[Callable[[str], list[tuple[str, str]]]]:
    """A trigger noting, for each lock row change, the synchronous_commit it commits under.

    Returns a function giving (operation, setting) for one id, in order.
    """
    statements = [
        "CREATE TABLE mm_commit_modes (n serial PRIMARY KEY, machine_id varchar, op text,"
        " mode text)",
        "CREATE FUNCTION mm_note_commit_mode() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " INSERT INTO mm_commit_modes (machine_id, op, mode) VALUES (NEW.machine_id, TG_OP,"
        " current_setting('synchronous_commit')); RETURN NEW; END $$",
        "CREATE TRIGGER mm_note_commit_mode AFTER INSERT OR UPDATE ON machine_memory_lock"
        " FOR EACH ROW EXECUTE FUNCTION mm_note_commit_mode()",
    ]
    with connections[alias].cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)

    def noted(mid: str) -> list[tuple[str, str]]:
        with connections[alias].cursor() as cursor:
            cursor.execute(
                "SELECT op, mode FROM mm_commit_modes WHERE machine_id = %s ORDER BY n", [mid]
            )
            return [(op, mode) for op, mode in cursor.fetchall()]

    try:
        yield noted
    finally:
        with connections[alias].cursor() as cursor:
            cursor.execute("DROP TRIGGER mm_note_commit_mode ON machine_memory_lock")
            cursor.execute("DROP FUNCTION mm_note_commit_mode")
            cursor.execute("DROP TABLE mm_commit_modes")


@pytest.mark.parametrize("alias", ["postgres"], indirect=True)
def test_postgresql_commits_a_release_alone_without_waiting_for_the_disk(
    alias: str, mid: str, commit_modes: Callable[[str], list[tuple[str, str]]]
) -> None:
    """unlock() (and a session left without a write) turns synchronous_commit off for its
    own transaction only; lock, extend and a session's write + release wait for the disk,
    and the setting does not outlive the release on its connection."""
    memory = MachineMemory(using=alias)
    assert memory.lock(mid)
    assert memory.extend(mid)
    assert memory.unlock(mid)
    assert memory.lock(mid)  # takes over the released row: an UPDATE on the same connection
    assert memory.unlock(mid)
    with memory.session(mid):
        pass
    with memory.session(mid) as s:
        s.write({"n": 1})
    assert commit_modes(mid) == [
        ("INSERT", "on"),  # lock
        ("UPDATE", "on"),  # extend
        ("UPDATE", "off"),  # unlock
        ("UPDATE", "on"),  # lock again
        ("UPDATE", "off"),  # unlock
        ("UPDATE", "on"),  # session: lock + read
        ("UPDATE", "off"),  # left without a write
        ("UPDATE", "on"),  # session: lock + read
        ("UPDATE", "on"),  # write + release, one commit
    ]
    with connections[alias].cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone() == ("on",)
    memory.close()
