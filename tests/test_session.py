"""``session()`` on the real databases: two round trips, one commit each, and every failure
rule of ``write`` (docs/contract.md#the-cycle-in-one-call).

The contract itself (denials, fencing, version checks, release on exit) is in the
conformance suite (machine_memory/testing.py), which every backend runs; here is what only
a real server can show: round trips counted on the wire, commits counted by the server,
contention between threads, and connections cut at each step.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING

import pytest
from django.db import connections, transaction
from django.utils import timezone

from machine_memory import MachineMemory
from machine_memory.connection import cursor_for
from machine_memory.exceptions import (
    LockLost,
    LockNotAcquired,
    MachineMemoryError,
    WriteConflict,
    WriteError,
)
from machine_memory.models import MachineLock, MachineState
from machine_memory.sql import dialect_for
from tests.test_fault_injection import (
    IDLE,
    assert_nothing_stored,
    assert_stays,
    assert_unknown,
    attempt,
    backend_id,
    read_real,
    row_locked,
    server_says,
    session_alive,
    wait_for_the_row_lock_wait,
    wait_until,
    while_the_check_stalls,
)
from tests.workers import ThreadRun, in_thread, run_threads

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.conftest import ProxiedDatabase

# PostgreSQL ends every round trip with one ReadyForQuery message ('Z', length 5, status):
# a pipeline of several statements still ends with one.
POSTGRES_READY = b"Z\x00\x00\x00\x05"
# The statement that opens each vendor's write + release, and its lock + read.
WRITE_AND_RELEASE = {
    "postgres": b"WITH w AS (",
    "mariadb": b"CALL machine_memory_write_and_release(",
}
ACQUIRE_AND_READ = {
    "postgres": b"machine_memory_acquire_and_read(",
    "mariadb": b"CALL machine_memory_acquire_and_read(",
}


def round_trips(proxied: ProxiedDatabase) -> Callable[[], int]:
    """A counter of the client's round trips through the proxy so far.

    MariaDB's protocol has one request per round trip (no pipelining); PostgreSQL's client
    may send a pipeline in several writes, but the server ends it with one ReadyForQuery.
    """
    if proxied.real == "postgres":
        ready = proxied.proxy.watch(POSTGRES_READY, replies=True)
        return lambda: ready.count
    return lambda: proxied.proxy.requests


def row_xids(alias: str, machine_id: str) -> tuple[int | None, int | None]:
    """The transactions that last changed the state row and the lock row (PostgreSQL's
    xmin; None for a missing row). Counted per row, not as the server's next transaction
    id: other clients of the server (a run beside this one) take ids too."""

    def read() -> tuple[int | None, int | None]:
        with connections[alias].cursor() as cursor:
            cursor.execute(
                f"SELECT (SELECT xmin::text::bigint FROM {MachineState._meta.db_table}"
                " WHERE machine_id = %s),"
                f" (SELECT xmin::text::bigint FROM {MachineLock._meta.db_table}"
                " WHERE machine_id = %s)",
                (machine_id, machine_id),
            )
            state, lock = cursor.fetchone()
            return state, lock

    return in_thread(read)


def test_session_is_two_round_trips_where_the_cycle_is_four(
    proxied: ProxiedDatabase, mid: str
) -> None:
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 0}, None)  # connected, and a state to read
    count = round_trips(proxied)

    start = count()
    with memory.session(mid) as s:
        took = count() - start
        assert s.state == {"n": 0}
        s.write({"n": 1})
        wrote = count() - start - took
    left = count() - start - took - wrote
    assert (took, wrote, left) == (1, 1, 0)

    # The same cycle in four calls, counted the same way: the counter sees every trip.
    start = count()
    assert memory.lock(mid)
    state = memory.read(mid)
    memory.write(mid, {"n": 2}, state)
    assert memory.unlock(mid)
    assert count() - start >= 4
    assert memory.read(mid) == {"n": 2}


@pytest.mark.parametrize("alias", ["postgres"], indirect=True)
def test_session_commits_once_to_lock_and_once_to_write(alias: str, mid: str) -> None:
    # The round trips are counted above; here, which transaction changed which row.
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 0}, None)
    wrote_first, no_lock = row_xids(alias, mid)
    assert wrote_first is not None and no_lock is None
    with memory.session(mid) as s:
        state_then, locked = row_xids(alias, mid)
        assert state_then == wrote_first  # lock + read: the lock row only
        assert locked is not None and locked != wrote_first
        assert s.written is False
        s.write({"n": 1})
        assert s.written is True
        written, released = row_xids(alias, mid)
    # write + release: both rows in one transaction, a new one.
    assert written == released and written not in {wrote_first, locked}
    assert row_xids(alias, mid) == (written, written)  # leaving after the write changes nothing
    assert MachineLock.objects.using(alias).get(pk=mid).expires_at <= timezone.now()


def test_session_with_redis_locks_costs_the_database_two_round_trips(
    proxied: ProxiedDatabase, redis_cache: str, mid: str
) -> None:
    from machine_memory.locks.redis import RedisLockBackend

    memory = MachineMemory(
        using=proxied.alias,
        lock_backend=RedisLockBackend(database=proxied.alias, cache=redis_cache),
    )
    memory.write(mid, {"n": 0}, None)
    count = round_trips(proxied)
    start = count()
    with memory.session(mid) as s:
        s.write({"n": (s.state or {})["n"] + 1})
    assert count() - start == 2  # the read and the fenced write; the lock is Redis's
    assert memory.read(mid) == {"n": 1}


def test_session_sets_the_metadata_columns(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    with memory.session(mid) as s:
        s.write({"executionStatus": "running"}, metadata={"source": "tests", "initiator": "me"})
    with memory.session(mid) as s:
        s.write({"executionStatus": "done"}, metadata={"source": "tests", "initiator": "me"})
    row = MachineState.objects.using(alias).get(pk=mid)
    assert (row.execution_status, row.source, row.initiator, row.version) == (
        "done",
        "tests",
        "me",
        2,
    )
    lock = MachineLock.objects.using(alias).get(pk=mid)
    assert lock.owner == memory.owner  # the session's lock row, released
    assert memory.lock_info(mid) is None


def test_contending_sessions_lose_no_update_and_never_read_stale(alias: str, mid: str) -> None:
    """Four threads, 25 increments each, on one id. A lock + read that read the state as
    it was before the previous holder's commit would surface as a WriteConflict."""
    workers, events = 4, 25
    MachineMemory(using=alias).write(mid, {"n": 0, "seen": []}, None)

    def worker(index: int) -> tuple[int, int]:
        memory = MachineMemory(using=alias, lock_retries=8, lock_backoff=0.005)
        denied = 0
        done = 0
        try:
            while done < events:
                try:
                    with memory.session(mid) as s:
                        assert s.state is not None
                        s.write({"n": s.state["n"] + 1, "seen": [*s.state["seen"][-9:], index]})
                except LockNotAcquired:
                    denied += 1
                    continue
                done += 1
        finally:
            memory.close()
        return done, denied

    results = run_threads(worker, workers)
    assert sum(done for done, _ in results) == workers * events
    state = MachineMemory(using=alias).read(mid)
    assert state is not None and state["n"] == workers * events
    assert MachineState.objects.using(alias).get(pk=mid).version == workers * events + 1


def test_lock_and_read_that_waited_for_the_holder_reads_what_it_committed(
    alias: str, mid: str
) -> None:
    """The holder writes and releases in one transaction; a session that asks for the lock
    meanwhile waits for that transaction and must then read its state, not the one before
    (a lock + read that took its snapshot before waiting would, and its write would fail)."""
    from django.db.models.functions import Now

    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 1}, None)
    assert memory.lock(mid)
    holding = threading.Event()
    go = threading.Event()

    def holder() -> None:
        # What the holder's write + release does, held open: state and release uncommitted.
        with transaction.atomic(using=alias):
            stored = MachineState.objects.using(alias).filter(pk=mid)
            assert stored.update(state={"n": 2}, version=2) == 1
            assert MachineLock.objects.using(alias).filter(pk=mid).update(expires_at=Now()) == 1
            holding.set()
            assert go.wait(30)

    def take() -> dict[str, object] | None:
        waiting = MachineMemory(using=alias, lock_retries=0)
        try:
            with waiting.session(mid) as s:
                seen = s.state
                s.write({"n": 3})
            return seen
        finally:
            waiting.close()

    held = ThreadRun(holder)
    assert holding.wait(30)
    taking = ThreadRun(take)
    time.sleep(0.3)
    assert taking.thread.is_alive(), "the lock + read did not wait for the holder's transaction"
    go.set()
    held.result()
    assert taking.result() == {"n": 2}
    assert memory.read(mid) == {"n": 3}


# What Dialect.install() makes under a name of its own, per vendor: (attribute, kind).
INSTALLED = {
    "postgresql": [("acquire_and_read_routine", "FUNCTION")],
    "mysql": [
        ("acquire_and_read_routine", "PROCEDURE"),
        ("write_and_release_routine", "PROCEDURE"),
    ],
    "sqlite": [("token_index", "INDEX")],
}


def test_what_this_code_installs_runs_the_session(alias: str, mid: str) -> None:
    """The routines (and SQLite's token index) as install() makes them now, under names of
    their own beside the ones migrate made: lock + read and write + release through them
    keep the contract (denial, version check, fence, release only with the write)."""
    connection = connections[alias]
    dialect = type(dialect_for(connection))()  # its own statement cache, for the new names
    objects = INSTALLED[connection.vendor]
    for attribute, _ in objects:
        setattr(dialect, attribute, f"{getattr(dialect, attribute)}_probe")
    with connection.schema_editor() as editor:
        dialect.install(editor)
    owner, other = "probe-owner", "probe-other"
    try:
        with dialect.errors(connection):
            cursor = cursor_for(connection)
            taken = dialect.acquire_and_read(cursor, mid, owner, 60)
            assert taken is not None
            (token, _, _), state = taken
            assert state is None
            assert dialect.acquire_and_read(cursor, mid, other, 60) is None  # denied
            meta = ("active", None, "probe", "tests")
            assert dialect.write_and_release(cursor, mid, '{"n": 1}', None, meta, token) == (
                True,
                True,
            )
            assert dialect.live_lock(cursor, mid) is None
            taken = dialect.acquire_and_read(cursor, mid, owner, 60)
            assert taken is not None
            (second, _, _), state = taken
            assert second > token
            assert state is not None and state[1:] == (1, meta)
            assert json.loads(state[0]) == {"n": 1}
            # A stale version: nothing written, the lock kept.
            assert dialect.write_and_release(cursor, mid, '{"n": 9}', 7, None, second) == (
                False,
                False,
            )
            assert dialect.live_lock(cursor, mid) is not None
            # The previous holder's token: fenced, nothing written, the lock kept.
            assert dialect.write_and_release(cursor, mid, '{"n": 9}', 1, None, token) == (
                False,
                False,
            )
            assert dialect.live_lock(cursor, mid) is not None
            changed = ("done", None, "probe", "tests")
            assert dialect.write_and_release(cursor, mid, '{"n": 2}', 1, changed, second) == (
                True,
                True,
            )
            assert dialect.live_lock(cursor, mid) is None
            stored = dialect.read(cursor, mid)
            assert stored is not None and stored[1:] == (2, changed)
            assert json.loads(stored[0]) == {"n": 2}
    finally:
        with connection.cursor() as cleanup:
            for attribute, kind in objects:
                cleanup.execute(f"DROP {kind} IF EXISTS {getattr(dialect, attribute)}")


def test_session_whose_lock_row_was_purged_is_lock_lost(alias: str, mid: str) -> None:
    """The lock expired and its row was purged: the row was the only record of who held the
    lock since, so the write is refused as if taken over (docs/contract.md#fencing), stores
    nothing, and the id is free for the redelivered event."""
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 1}, None)
    with memory.session(mid, ttl=0.2) as s:
        time.sleep(0.3)
        assert MachineLock.objects.using(alias).filter(machine_id=mid).expired().delete()[0] == 1
        with pytest.raises(LockLost):
            s.write({"n": 2})
        assert not s.written
    assert memory.read(mid) == {"n": 1}
    assert memory.lock_info(mid) is None
    assert memory.lock(mid)
    assert memory.unlock(mid)


def test_session_inside_atomic_uses_the_classic_statements(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    if not connections[alias].features.has_select_for_update:
        # SQLite: one writer, so a lock cannot commit apart from the transaction.
        with (
            transaction.atomic(using=alias),
            pytest.raises(MachineMemoryError, match=r"inside transaction\.atomic"),
            memory.session(mid),
        ):
            raise AssertionError("must not run")
        assert memory.lock_info(mid) is None
        return
    other = MachineMemory(using=alias, lock_retries=0)
    try:
        with transaction.atomic(using=alias):
            with memory.session(mid) as s:
                assert in_thread(lambda: other.lock(mid)) is False  # committed on its own
                s.write({"in": "atomic"})
                # The write commits with the transaction: the lock is kept until the exit.
                assert memory.holds(mid)
            assert not memory.holds(mid)
        assert other.read(mid) == {"in": "atomic"}
    finally:
        memory.close()  # the lock's own connection


# -- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after-reply"])
def test_lock_and_read_cut_is_settled_on_a_fresh_connection_with_the_sessions_ttl(
    proxied: ProxiedDatabase, mid: str, where: str
) -> None:
    """Cut before the server took the lock, the look on a fresh connection takes it then;
    cut after (the reply lost), it finds the lock its own and adopts it. Either way, with
    the TTL the session asked for."""
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 5}, None)
    statement = ACQUIRE_AND_READ[proxied.real]
    if where == "before":
        trigger = proxied.proxy.cut_before(statement)
    else:
        trigger = proxied.proxy.cut_after_reply(statement)
    with memory.session(mid, ttl=600) as s:
        assert trigger.count == 1
        assert s.state == {"n": 5} and s.version == 1
        info = memory.lock_info(mid)
        assert info is not None and info.token == s.token
        left = (info.expires_at - timezone.now()).total_seconds()
        assert 590 < left <= 600, left  # the session's TTL, not the default
        s.write({"n": 6})
    assert memory.read(mid) == {"n": 6}
    assert MachineMemory(using=proxied.real, lock_retries=0).lock_info(mid) is None


@pytest.mark.parametrize("create", [False, True], ids=["update", "create"])
@pytest.mark.parametrize("keep_upstream", [False, True], ids=["both-sides", "server-kept"])
def test_write_and_release_cut_before_the_server_stores_nothing_and_keeps_the_lock(
    proxied: ProxiedDatabase, mid: str, create: bool, keep_upstream: bool
) -> None:
    memory = MachineMemory(using=proxied.alias)
    if not create:
        memory.write(mid, {"n": 0}, None)
    other = MachineMemory(using=proxied.real, lock_retries=0)
    trigger = proxied.proxy.cut_before(WRITE_AND_RELEASE[proxied.real], keep_upstream=keep_upstream)
    with memory.session(mid) as s:
        with pytest.raises(WriteError, match="Nothing was stored") as raised:
            s.write({"n": 1})
        assert not isinstance(raised.value, WriteConflict)
        assert trigger.count == 1 and not s.written
        assert other.read(mid) == (None if create else {"n": 0})
        assert in_thread(lambda: other.lock(mid)) is False  # still ours
    assert other.lock(mid)  # released on the way out
    assert other.unlock(mid)


@pytest.mark.parametrize("create", [False, True], ids=["update", "create"])
def test_write_and_release_whose_commit_reply_was_lost_returns_normally(
    proxied: ProxiedDatabase, mid: str, create: bool
) -> None:
    memory = MachineMemory(using=proxied.alias)
    if not create:
        memory.write(mid, {"n": 0}, None)
    trigger = proxied.proxy.cut_after_reply(WRITE_AND_RELEASE[proxied.real], keep_upstream=True)
    with memory.session(mid) as s:
        s.write({"n": 1})
        assert trigger.count == 1 and s.written
    other = MachineMemory(using=proxied.real, lock_retries=0)
    assert other.read(mid) == {"n": 1}
    assert other.lock(mid)  # the write and the release landed together
    assert other.unlock(mid)


# -- a write + release caught by a fault at its worst moment ----------------------------------


@pytest.mark.parametrize("create", [False, True], ids=["update", "create"])
def test_write_and_release_cut_while_waiting_for_a_row_lock_never_lands(
    proxied: ProxiedDatabase, mid: str, create: bool
) -> None:
    """The statement waits for a row lock when its connection is cut, the server keeping
    the session: unless that session is ended first, it would run once the row is free.
    Reported as not stored (a create too: the lock still held with the session's token
    shows that the write, which commits with the release, did not), and it stays so."""
    memory = MachineMemory(using=proxied.alias)
    before = None if create else {"n": 0}
    if before is not None:
        memory.write(mid, before, None)
    sessions: list[int] = []
    with memory.session(mid) as s:
        # Only the writer's connection goes through the proxy from here on.
        connections[proxied.alias].close()
        wait_until(lambda: proxied.proxy.open_links == 0, "the set-up connection to close")

        def on_the_wire() -> BaseException | None:
            sessions.append(backend_id(proxied.alias))
            return attempt(lambda: s.write({"n": 1}))

        with row_locked(proxied.real, mid, "create" if create else "update"):
            sent = proxied.proxy.watch(WRITE_AND_RELEASE[proxied.real])
            run = ThreadRun(on_the_wire)
            assert sent.wait(10)
            wait_for_the_row_lock_wait(proxied.real, sessions, run)
            assert proxied.proxy.cut(keep_upstream=True) == 1
            outcome = run.result(timeout=20)
            assert_nothing_stored(outcome, mid)
            assert not session_alive(proxied.real, sessions[0])
        assert_stays(proxied.real, mid, before)
        assert not s.written
        info = MachineMemory(using=proxied.real).lock_info(mid)
        assert info is not None and info.token == s.token  # still ours
    assert MachineMemory(using=proxied.real).lock_info(mid) is None  # released on leaving


def test_write_and_release_cut_while_others_moved_the_state_on_stored_nothing(
    proxied: ProxiedDatabase, mid: str
) -> None:
    """The write + release never reached the server; before the memory could look, other
    writers (without the lock) moved the state two versions on, so the row cannot tell.
    The lock can: still live with the session's token, it was not released, so the write
    (one transaction with the release) did not commit: nothing was stored."""
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 0}, None)
    with memory.session(mid) as s:
        proxied.proxy.cut_before(WRITE_AND_RELEASE[proxied.real], then="stall")

        def others_write(other: MachineMemory) -> None:
            other.write(mid, {"n": "a"}, other.read(mid))
            other.write(mid, {"n": "b"}, other.read(mid))

        outcome = while_the_check_stalls(proxied, lambda: s.write({"n": 1}), others_write)
        assert_nothing_stored(outcome, mid)
        assert not s.written
    assert read_real(proxied.real, mid) == {"n": "b"}


def test_session_create_deleted_before_it_could_be_checked_is_unknown(
    proxied: ProxiedDatabase, mid: str
) -> None:
    """The create and the release committed, the reply was lost, and another worker deleted
    the state before the memory looked: no row, no lock. Either could mean it never landed;
    "nothing was stored" would be a lie, so the outcome is unknown."""
    memory = MachineMemory(using=proxied.alias)
    with memory.session(mid) as s:
        proxied.proxy.cut_after_reply(
            WRITE_AND_RELEASE[proxied.real], keep_upstream=True, then="stall"
        )

        def delete_it(other: MachineMemory) -> None:
            assert other.read(mid) == {"n": 1}  # it landed
            other.delete(mid)

        outcome = while_the_check_stalls(proxied, lambda: s.write({"n": 1}), delete_it)
        assert_unknown(outcome, mid, "gone")
    assert MachineMemory(using=proxied.real).lock_info(mid) is None


@pytest.mark.parametrize("create", [False, True], ids=["update", "create"])
def test_write_and_release_whose_reply_stalls_is_settled_as_stored(
    proxied: ProxiedDatabase, mid: str, create: bool
) -> None:
    """The server committed the write and the release; the reply hangs until the network
    gives up. Settled on a fresh connection as stored, with nothing left to release."""
    memory = MachineMemory(using=proxied.alias)
    if not create:
        memory.write(mid, {"n": 0}, None)
    with memory.session(mid) as s:
        session = backend_id(proxied.alias)
        held = proxied.proxy.hold_reply(WRITE_AND_RELEASE[proxied.real])

        def network_gives_up() -> None:
            assert held.wait(10)
            if proxied.real == "postgres":
                # libpq has no read timeout: the stall lasts until the network gives up.
                wait_until(lambda: server_says("postgres", IDLE["postgres"], session), "commit")
                assert proxied.proxy.cut(keep_upstream=True) == 1
            # MariaDB: the alias's read_timeout turns the stall into an error by itself.

        helper = ThreadRun(network_gives_up)
        s.write({"n": 1})
        helper.result(timeout=20)
        assert s.written
    assert read_real(proxied.real, mid) == {"n": 1}
    assert MachineMemory(using=proxied.real).lock_info(mid) is None


@pytest.mark.parametrize("stored", [False, True], ids=["new", "stored"])
def test_read_holding_reads_under_a_lock_taken_by_lock(alias: str, mid: str, stored: bool) -> None:
    """A front end that took the lock with lock() (or adopt()) reads as lock_and_read does:
    the state, its version, and the lock itself when asked."""
    memory = MachineMemory(using=alias)
    if stored:
        memory.write(mid, {"n": 1}, None)
    assert memory.lock(mid)
    try:
        locked = memory.read_holding(mid)
        assert (locked.machine_id, locked.token) == (mid, memory.held_token(mid))
        assert (locked.state, locked.version) == (({"n": 1}, 1) if stored else (None, None))
        assert locked.lock_info() == memory.lock_info(mid)
    finally:
        assert memory.unlock(mid)


def test_read_holding_that_cannot_read_releases_the_lock(
    alias: str, redis_cache: str, mid: str
) -> None:
    """Locks in Redis, states in a database that does not answer: the read fails, and the
    lock is released rather than left to its TTL, since nobody got a state to act on."""
    from django.conf import settings

    from machine_memory.exceptions import ReadError
    from machine_memory.locks.redis import RedisLockBackend

    down = settings.DOWN_DATABASES[alias]
    memory = MachineMemory(
        using=down, lock_backend=RedisLockBackend(database=down, cache=redis_cache)
    )
    assert memory.lock(mid)
    with pytest.raises(ReadError):
        memory.read_holding(mid)
    assert not memory.holds(mid)
    assert memory.lock_info(mid) is None
