"""The operators' management commands, on every database.

The lock and state tables are shared by the whole run (no test transaction), so each test
asserts on its own ids, and counts as "at least".
"""

from __future__ import annotations

import json
import re
import threading
from io import StringIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from django.test import override_settings

from machine_memory import MachineMemory
from machine_memory.locks.base import LockBackend
from machine_memory.models import (
    MachineLock,
    MachineLockQuerySet,
    MachineState,
    MachineStateQuerySet,
    StorageTime,
)
from machine_memory.sql import dialect_for
from tests.support import new_id
from tests.test_clock import SKEWS, app_clock_moved

if TYPE_CHECKING:
    from collections.abc import Iterator

    from machine_memory.locks.base import Fence


def run(name: str, *args: str, **options: Any) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(name, *args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def routed(alias: str) -> Iterator[str]:
    """MACHINE_MEMORY['DATABASE'] pointed at the alias under test."""
    with override_settings(MACHINE_MEMORY={"DATABASE": alias}):
        yield alias


def expired_lock(alias: str, machine_id: str | None = None, ago: float = 0.0) -> str:
    """A lock row that is expired (released), ``ago`` seconds ago by the database clock."""
    machine_id = machine_id or new_id("purge")
    memory = MachineMemory(using=alias)
    assert memory.lock(machine_id)
    assert memory.unlock(machine_id)
    if ago:
        MachineLock.objects.using(alias).filter(pk=machine_id).update(expires_at=StorageTime(-ago))
    return machine_id


def live_lock(alias: str, ttl: float = 60) -> tuple[str, MachineMemory]:
    machine_id = new_id("live")
    memory = MachineMemory(using=alias)
    assert memory.lock(machine_id, ttl=ttl)
    return machine_id, memory


def lock_ids(alias: str, ids: list[str]) -> set[str]:
    return set(MachineLock.objects.using(alias).filter(pk__in=ids).values_list("pk", flat=True))


SUMMARY = re.compile(
    r"^Purged (\d+) expired lock\(s\)( that expired at least [\d.]+ s ago)? from database "
    r"'(\w+)' in (\d+) batch\(es\)\.\n$"
)


# -- purge_expired_locks -----------------------------------------------------------------


def test_purge_expired_locks_deletes_expired_and_keeps_live(routed: str) -> None:
    expired = [expired_lock(routed) for _ in range(5)]
    live, holder = live_lock(routed)  # acquired last: holds the highest token
    out, _ = run("purge_expired_locks", "--batch-size", "2")
    match = SUMMARY.match(out)
    assert match, out
    deleted, database, batches = int(match[1]), match[3], int(match[4])
    assert deleted >= 5 and batches >= 3 and database == routed
    assert lock_ids(routed, [*expired, live]) == {live}
    info = holder.lock_info(live)
    assert info is not None and info.owner == holder.owner
    assert holder.unlock(live)


def test_purge_expired_locks_dry_run_deletes_nothing(alias: str) -> None:
    expired = [expired_lock(alias) for _ in range(3)]
    live, holder = live_lock(alias)
    out, _ = run("purge_expired_locks", "--dry-run", "--database", alias)
    match = re.match(r"^Would purge (\d+) expired lock\(s\) from database '(\w+)' \(dry run", out)
    assert match, out
    assert int(match[1]) >= 3 and match[2] == alias
    assert lock_ids(alias, expired) == set(expired)
    assert holder.unlock(live)


def test_purge_expired_locks_older_than(alias: str) -> None:
    old = expired_lock(alias, ago=3600)
    recent = expired_lock(alias, ago=5)
    live, holder = live_lock(alias)
    out, _ = run("purge_expired_locks", "--older-than", "600", "--database", alias)
    assert "that expired at least 600 s ago" in out
    assert lock_ids(alias, [old, recent]) == {recent}
    assert holder.unlock(live)


@SKEWS
def test_purge_expired_locks_judges_expiry_by_the_database_clock(routed: str, skew: float) -> None:
    # Only the database's clock says what has expired. By an application clock an hour ahead
    # the purge would delete a live lock (and with it the row its holder's writes are fenced
    # by); an hour behind, it would keep every lock that expired within the hour.
    old = expired_lock(routed, ago=60)
    recent = expired_lock(routed)
    live, holder = live_lock(routed)  # acquired last: holds the highest token
    with app_clock_moved(skew):
        run("purge_expired_locks", "--older-than", "30")
        assert lock_ids(routed, [old, recent, live]) == {recent, live}
        run("purge_expired_locks")
        assert lock_ids(routed, [old, recent, live]) == {live}
        info = holder.lock_info(live)
    assert info is not None and info.owner == holder.owner
    assert holder.unlock(live)


def test_purge_expired_locks_keeps_the_token_high_water_row(alias: str) -> None:
    for _ in range(2):
        expired_lock(alias)
    top = expired_lock(alias)  # the highest token in the table, expired
    run("purge_expired_locks", "--database", alias)
    remaining = lock_ids(alias, [top])
    if dialect_for(connections[alias]).token_high_water_row:
        assert remaining == {top}
        # The next token is still higher than every token handed out before.
        memory = MachineMemory(using=alias)
        token = MachineLock.objects.using(alias).get(pk=top).token
        fresh = new_id()
        assert memory.lock(fresh)
        info = memory.lock_info(fresh)
        assert info is not None and info.token > token
        assert memory.unlock(fresh)
    else:
        assert remaining == set()  # tokens come from a sequence: no row needs keeping


def claims_rows(alias: str) -> bool:
    """Whether purge batches claim their rows (SELECT ... FOR UPDATE SKIP LOCKED) here."""
    return MachineLock.objects.using(alias).claims_rows()


def sessions_waiting_for_a_row_lock(alias: str) -> int:
    """Sessions on ``alias``'s test database that wait for a row lock, from a connection of
    this thread (PostgreSQL, MariaDB)."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # pg_stat_activity is a snapshot per transaction: take a fresh one.
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
        else:
            cursor.execute(
                "SELECT count(*) FROM information_schema.INNODB_TRX t"
                " JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id"
                " WHERE t.trx_state = 'LOCK WAIT' AND p.DB = DATABASE()"
            )
        (count,) = cursor.fetchone()
    return int(count)


def wait_until_a_session_waits(alias: str, deadline: float = 30.0) -> bool:
    """Poll until another session waits for a row lock; False if none did by ``deadline``."""
    import time

    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if sessions_waiting_for_a_row_lock(alias):
            return True
        # MariaDB refreshes INNODB_TRX only when nobody read it for 0.1 s.
        time.sleep(0.25)
    return False


@pytest.mark.parametrize("claiming", [True, False], ids=["as-configured", "no-row-claims"])
def test_purge_race_a_lock_taken_again_after_selection_survives(
    alias: str, monkeypatch: pytest.MonkeyPatch, claiming: bool
) -> None:
    """A lock taken again between a batch's SELECT and its DELETE ends up held, never purged.

    The selection step is wrapped: once it has returned the batch holding the target,
    another thread (its own database connection) takes the expired lock over for real.

    Where the batch claims its rows (PostgreSQL, MariaDB: FOR UPDATE SKIP LOCKED) the
    takeover has to wait for the batch's commit: the test sees it waiting for the row lock,
    the batch deletes the expired row, and the takeover then gets the lock. Where rows are
    not claimed (SQLite; and every database with ``claims_rows`` off, the "no-row-claims"
    run) the takeover lands before the DELETE, which re-checks the expiry and leaves the
    row alone.
    """
    if not claiming:
        monkeypatch.setattr(MachineLockQuerySet, "claims_rows", lambda self: False)
    claimed = claiming and connections[alias].vendor != "sqlite"  # not claims_rows(): it is tested
    target = expired_lock(alias)
    others = [expired_lock(alias) for _ in range(3)]
    # The token high-water row (SQLite keeps it) is a live lock, not ours.
    live, holder = live_lock(alias)
    taker = MachineMemory(using=alias)
    taken: list[bool] = []
    waited: list[bool] = []
    threads: list[threading.Thread] = []
    select = MachineLockQuerySet.next_batch

    def acquire_from_another_connection() -> None:
        try:
            taken.append(taker.lock(target, ttl=60))
        finally:
            connections[alias].close()

    def selection_then_takeover(
        self: MachineLockQuerySet, after: Any, size: int, *, claim: bool = False
    ) -> list[Any]:
        keys = select(self, after, size, claim=claim)
        if target in keys and not threads:
            assert claim is claimed
            thread = threading.Thread(target=acquire_from_another_connection)
            threads.append(thread)
            thread.start()
            if claimed:
                # The takeover waits for this batch's row lock; the DELETE runs meanwhile.
                waited.append(wait_until_a_session_waits(alias))
            else:
                thread.join(timeout=30)
                assert taken == [True], "the takeover did not happen between selection and delete"
        return keys

    monkeypatch.setattr(MachineLockQuerySet, "next_batch", selection_then_takeover)
    out, _ = run("purge_expired_locks", "--database", alias, "--batch-size", "500")
    [thread] = threads
    thread.join(timeout=60)
    assert SUMMARY.match(out), out
    assert waited == ([True] if claimed else [])
    assert taken == [True]
    assert lock_ids(alias, [target, *others]) == {target}
    info = taker.lock_info(target)
    assert info is not None and info.owner == taker.owner
    assert taker.unlock(target)
    assert holder.unlock(live)


def hold_row_lock(
    alias: str, rows: Any, held: threading.Event, release: threading.Event, errors: list[str]
) -> None:
    """In a thread of its own: lock ``rows`` (SELECT ... FOR UPDATE) in a transaction, signal
    ``held``, keep the transaction open until ``release`` (at most a minute), roll back."""
    from django.db import transaction

    try:
        with transaction.atomic(using=alias):
            locked = list(rows.using(alias).select_for_update().values_list("pk", flat=True))
            if not locked:
                errors.append("nothing to lock")
            held.set()
            # A purge that waited for this lock would go on after the minute and delete
            # the row: the test then fails on the row's absence instead of hanging.
            if not release.wait(timeout=60):
                errors.append("never released")
            transaction.set_rollback(True, using=alias)
    except Exception as exc:  # reported by the test
        errors.append(repr(exc))
    finally:
        held.set()
        connections[alias].close()


@pytest.fixture
def row_locks(alias: str) -> str:
    # Decided by the vendor, not by claims_rows(): a claims_rows() that wrongly said no
    # would otherwise skip the very tests that show what it costs.
    if connections[alias].vendor == "sqlite":
        assert not claims_rows(alias)
        pytest.skip("sqlite has no SELECT ... FOR UPDATE SKIP LOCKED")
    assert claims_rows(alias)  # PostgreSQL and MariaDB have it
    return alias


def test_purge_expired_locks_skips_a_row_locked_by_another_transaction(row_locks: str) -> None:
    alias = row_locks
    busy = expired_lock(alias)
    free = [expired_lock(alias) for _ in range(3)]
    live, live_holder = live_lock(alias)
    held, release = threading.Event(), threading.Event()
    errors: list[str] = []
    holder = threading.Thread(
        target=hold_row_lock,
        args=(alias, MachineLock.objects.filter(pk=busy), held, release, errors),
    )
    holder.start()
    try:
        assert held.wait(timeout=30) and not errors, errors
        # Batches of one: the locked row is skipped, and the batches after it go on.
        out, _ = run("purge_expired_locks", "--database", alias, "--batch-size", "1")
        assert SUMMARY.match(out), out
        assert lock_ids(alias, [busy, *free]) == {busy}
    finally:
        release.set()
        holder.join(timeout=90)
    assert errors == []
    # The next run purges it.
    run("purge_expired_locks", "--database", alias)
    assert lock_ids(alias, [busy]) == set()
    assert live_holder.unlock(live)


def test_purge_expired_locks_leaves_a_skipped_row_to_the_next_run_even_once_freed(
    row_locks: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys only move forward: a run does not go back for the rows it skipped, so it ends
    after one pass however busy the table is. Here the row is freed as soon as the batches
    have passed it, and the run still leaves it."""
    alias = row_locks
    made = [expired_lock(alias) for _ in range(4)]
    # The first of them in the database's own order of keys: the others come after it.
    busy, *free = (
        MachineLock.objects.using(alias)
        .filter(pk__in=made)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    held, release = threading.Event(), threading.Event()
    errors: list[str] = []
    holder = threading.Thread(
        target=hold_row_lock,
        args=(alias, MachineLock.objects.filter(pk=busy), held, release, errors),
    )
    select = MachineLockQuerySet.next_batch
    batches: list[list[Any]] = []
    freed: list[int] = []

    def free_the_row_once_passed(
        self: MachineLockQuerySet, after: Any, size: int, *, claim: bool = False
    ) -> list[Any]:
        keys = select(self, after, size, claim=claim)
        batches.append(keys)
        if set(keys) & set(free) and not freed:
            release.set()
            holder.join(timeout=90)  # rolled back: the row is expired and free again
            freed.append(len(batches))
        return keys

    holder.start()
    try:
        assert held.wait(timeout=30) and not errors, errors
        monkeypatch.setattr(MachineLockQuerySet, "next_batch", free_the_row_once_passed)
        run("purge_expired_locks", "--database", alias, "--batch-size", "1")
    finally:
        release.set()
        holder.join(timeout=90)
    assert errors == []
    assert freed and freed[0] < len(batches)  # batches ran after it was freed
    assert all(busy not in keys for keys in batches)
    assert lock_ids(alias, [busy, *free]) == {busy}
    monkeypatch.undo()
    run("purge_expired_locks", "--database", alias)
    assert lock_ids(alias, [busy]) == set()


def test_purge_machine_states_skips_a_row_locked_by_another_transaction(row_locks: str) -> None:
    alias = row_locks
    status = f"done-{new_id()}"
    busy, free = state(alias, status), state(alias, status)
    held, release = threading.Event(), threading.Event()
    errors: list[str] = []
    holder = threading.Thread(
        target=hold_row_lock,
        args=(alias, MachineState.objects.filter(pk=busy), held, release, errors),
    )
    holder.start()
    try:
        assert held.wait(timeout=30) and not errors, errors
        out, _ = run("purge_machine_states", "--status", status, "--database", alias)
        assert out.startswith("Purged 1 machine state(s)"), out
        assert state_ids(alias, [busy, free]) == {busy}
    finally:
        release.set()
        holder.join(timeout=90)
    assert errors == []
    out, _ = run("purge_machine_states", "--status", status, "--database", alias)
    assert out.startswith("Purged 1 machine state(s)"), out
    assert state_ids(alias, [busy]) == set()


def test_purge_expired_locks_logs_batches_with_verbosity_2(alias: str) -> None:
    for _ in range(3):
        expired_lock(alias)
    live, holder = live_lock(alias)
    _, err = run("purge_expired_locks", "--database", alias, "--batch-size", "1", verbosity=2)
    lines = err.splitlines()
    assert "INFO machine_memory_lock batch 1: deleted 1 of 1 selected rows." in lines, err
    assert all(
        re.fullmatch(r"INFO machine_memory_lock batch \d+: deleted [01] of 1 selected rows\.", line)
        for line in lines
    ), err
    _, quiet = run("purge_expired_locks", "--database", alias, verbosity=1)
    assert quiet == ""
    assert holder.unlock(live)


def test_purge_expired_locks_fails_with_a_command_error(alias: str) -> None:
    down = settings.DOWN_DATABASES[alias]
    with pytest.raises(CommandError, match=f"Purging expired locks on database '{down}' failed"):
        run("purge_expired_locks", "--database", down)


class ExternalLocks(LockBackend):
    """Stands in for a lock store outside the database (Redis): only its type matters."""

    def acquire(self, machine_id: str, owner: str, ttl: float) -> int | None:
        raise NotImplementedError

    def release(self, machine_id: str, owner: str) -> bool:
        raise NotImplementedError

    def extend(self, machine_id: str, owner: str, token: int, ttl: float) -> bool:
        raise NotImplementedError

    def info(self, machine_id: str) -> Any:
        raise NotImplementedError

    def fence(self, machine_id: str, owner: str, token: int) -> Fence:
        raise NotImplementedError

    def is_lost(self, machine_id: str, owner: str, token: int) -> bool:
        raise NotImplementedError


@pytest.mark.parametrize("backend", ["redis", "tests.test_commands.ExternalLocks"])
def test_purge_expired_locks_with_locks_outside_the_database(backend: str) -> None:
    if backend == "redis":
        pytest.importorskip("machine_memory.locks.redis")
    with override_settings(MACHINE_MEMORY={"LOCK_BACKEND": backend, "REDIS_CACHE": "redis"}):
        out, _ = run("purge_expired_locks")
    assert "which expires them itself: nothing to purge" in out, out
    assert out.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["--batch-size", "many"], "--batch-size: 'many' is not a whole number"),
        (["--older-than", "-1"], "--older-than: must be a number of seconds from 0 to 3153600000"),
        (["--older-than", "nan"], "--older-than: must be a number of seconds from 0 to"),
        (["--older-than", "1e30"], "--older-than: must be a number of seconds from 0 to"),
        (["--older-than", "soon"], "--older-than: 'soon' is not a number of seconds"),
        (["--database", "nope"], "--database: 'nope' is not in settings.DATABASES"),
    ],
)
def test_purge_expired_locks_rejects_bad_arguments(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        run("purge_expired_locks", *args)


# -- purge_machine_states ----------------------------------------------------------------


def state(alias: str, status: str | None, ago: float = 0.0) -> str:
    machine_id = new_id("state")
    document: dict[str, Any] = {"step": 1}
    if status is not None:
        document["executionStatus"] = status
    MachineMemory(using=alias).write(machine_id, document, None)
    if ago:
        MachineState.objects.using(alias).filter(pk=machine_id).update(updated_at=StorageTime(-ago))
    return machine_id


def state_ids(alias: str, ids: list[str]) -> set[str]:
    return set(MachineState.objects.using(alias).filter(pk__in=ids).values_list("pk", flat=True))


def test_purge_machine_states_by_status(routed: str) -> None:
    status = f"done-{new_id()}"  # a status of this test's own
    done = [state(routed, status) for _ in range(3)]
    running = state(routed, "running")
    out, _ = run("purge_machine_states", "--status", status, "--batch-size", "2")
    assert out == (
        f"Purged 3 machine state(s) (status {status!r}) from database {routed!r} in 2 "
        "batch(es); states with a live lock were kept.\n"
    )
    assert state_ids(routed, [*done, running]) == {running}


def test_purge_machine_states_by_status_and_age(alias: str) -> None:
    status = f"done-{new_id()}"
    old, recent = state(alias, status, ago=7200), state(alias, status)
    other = state(alias, f"failed-{new_id()}", ago=7200)
    out, _ = run(
        "purge_machine_states", "--status", status, "--older-than", "3600", "--database", alias
    )
    assert out.startswith(f"Purged 1 machine state(s) (status {status!r}, not written for 3600 s)")
    assert state_ids(alias, [old, recent, other]) == {recent, other}


def test_purge_machine_states_several_statuses_and_dry_run(alias: str) -> None:
    first, second = f"a-{new_id()}", f"b-{new_id()}"
    ids = [state(alias, first), state(alias, second), state(alias, "running")]
    out, _ = run(
        "purge_machine_states", "--status", first, "--status", second, "--dry-run",
        "--database", alias,
    )  # fmt: skip
    assert out.startswith(f"Would purge 2 machine state(s) (status {first!r} or {second!r})")
    assert state_ids(alias, ids) == set(ids)
    run("purge_machine_states", "--status", first, "--status", second, "--database", alias)
    assert state_ids(alias, ids) == {ids[2]}


def test_purge_machine_states_keeps_a_state_whose_lock_is_live(alias: str) -> None:
    status = f"done-{new_id()}"
    locked, free = state(alias, status), state(alias, status)
    holder = MachineMemory(using=alias)
    assert holder.lock(locked)
    out, _ = run("purge_machine_states", "--status", status, "--database", alias)
    assert out.startswith("Purged 1 machine state(s)")
    assert state_ids(alias, [locked, free]) == {locked}
    assert holder.unlock(locked)


def test_purge_machine_states_race_a_state_locked_after_selection_survives(
    alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    status = f"done-{new_id()}"
    target, other = state(alias, status), state(alias, status)
    taker = MachineMemory(using=alias)
    taken: list[bool] = []
    select = MachineStateQuerySet.next_batch

    def lock_from_another_connection() -> None:
        try:
            taken.append(taker.lock(target, ttl=60))
        finally:
            connections[alias].close()

    def selection_then_lock(
        self: MachineStateQuerySet, after: Any, size: int, *, claim: bool = False
    ) -> list[Any]:
        keys = select(self, after, size, claim=claim)
        if target in keys and not taken:
            thread = threading.Thread(target=lock_from_another_connection)
            thread.start()
            thread.join(timeout=30)
        return keys

    monkeypatch.setattr(MachineStateQuerySet, "next_batch", selection_then_lock)
    run("purge_machine_states", "--status", status, "--database", alias)
    assert taken == [True]
    assert state_ids(alias, [target, other]) == {target}
    assert taker.unlock(target)


def test_purge_machine_states_needs_a_filter() -> None:
    with pytest.raises(CommandError, match="--status STATUS and/or --older-than SECONDS"):
        run("purge_machine_states")


def test_purge_machine_states_fails_with_a_command_error(alias: str) -> None:
    down = settings.DOWN_DATABASES[alias]
    with pytest.raises(CommandError, match=f"Purging machine states on database '{down}' failed"):
        run("purge_machine_states", "--older-than", "0", "--database", down)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "a week"], "--older-than: 'a week' is not a number of seconds"),
        (["--older-than", "inf"], "--older-than: must be a number of seconds from 0 to"),
        (["--older-than", "1e12"], "(100 years), got 1e12"),
        (["--status", "done", "--batch-size", "-5"], "--batch-size: must be at least 1"),
    ],
)
def test_purge_machine_states_rejects_bad_arguments(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        run("purge_machine_states", *args)


# -- machine_memory_inspect --------------------------------------------------------------


def test_inspect_shows_state_metadata_and_lock(routed: str) -> None:
    machine_id = new_id("inspect") + "/+=="
    memory = MachineMemory(using=routed)
    document = {"executionStatus": "running", "source": "com.orders", "items": [1, "<b>"]}
    metadata = {"parent_subject": "parent-1"}
    memory.write(machine_id, document, None, metadata=metadata)
    memory.write(machine_id, {**document, "items": [1, 2]}, memory.read(machine_id), metadata)
    assert memory.lock(machine_id, ttl=60)
    out, _ = run("machine_memory_inspect", machine_id)
    assert f"machine   {machine_id}\n" in out
    assert "version   2\n" in out and "status    running\n" in out
    assert "parent    parent-1\n" in out and "source    com.orders\n" in out
    assert re.search(rf"lock      live, [\d.]+ s left: owner {re.escape(memory.owner)}, token", out)
    pretty = '{\n  "executionStatus": "running",\n  "items": [\n    1,\n    2\n  ],\n'
    assert out.endswith(f'state:\n{pretty}  "source": "com.orders"\n}}\n')
    assert memory.unlock(machine_id)
    out, _ = run("machine_memory_inspect", machine_id)
    assert f"lock      expired: owner {memory.owner}" in out


def test_inspect_json(alias: str) -> None:
    machine_id = new_id("inspect")
    memory = MachineMemory(using=alias)
    memory.write(machine_id, {"n": 1, "text": "é漢"}, None)
    out, _ = run("machine_memory_inspect", machine_id, "--json", "--database", alias)
    report = json.loads(out)
    assert report["machine_id"] == machine_id
    assert report["version"] == 1 and report["state"] == {"n": 1, "text": "é漢"}
    assert report["metadata"] == {
        "execution_status": None,
        "parent_id": None,
        "initiator": None,
        "source": None,
    }
    assert report["lock"] is None
    assert memory.lock(machine_id, ttl=30)
    lock = json.loads(run("machine_memory_inspect", machine_id, "--json", "--database", alias)[0])[
        "lock"
    ]
    assert lock["status"] == "live" and lock["owner"] == memory.owner
    assert 0 < lock["seconds_left"] <= 30
    assert memory.unlock(machine_id)


def test_inspect_a_lock_without_state(alias: str) -> None:
    machine_id, holder = live_lock(alias)
    out, _ = run("machine_memory_inspect", machine_id, "--database", alias)
    assert "state     none\n" in out and "lock      live" in out and "state:" not in out
    assert holder.unlock(machine_id)


def test_inspect_unknown_machine(alias: str) -> None:
    with pytest.raises(CommandError, match="has no state and no lock on database"):
        run("machine_memory_inspect", new_id(), "--database", alias)


@pytest.mark.parametrize(
    ("machine_id", "message"),
    [("", "non-empty"), ("x" * 513, "the limit is 512"), ("a\x00b", "NUL")],
)
def test_inspect_and_release_reject_bad_ids(machine_id: str, message: str) -> None:
    for command in ("machine_memory_inspect", "machine_memory_release"):
        with pytest.raises(CommandError, match=message):
            run(command, machine_id)


def test_inspect_fails_with_a_command_error(alias: str) -> None:
    with pytest.raises(CommandError, match="Reading machine 'm' failed"):
        run("machine_memory_inspect", "m", "--database", settings.DOWN_DATABASES[alias])


# -- machine_memory_release --------------------------------------------------------------


def answer(monkeypatch: pytest.MonkeyPatch, reply: str | None) -> list[str]:
    """Answer the confirmation prompt with ``reply`` (None: no terminal); return prompts."""
    prompts: list[str] = []

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        if reply is None:
            raise EOFError
        return reply

    monkeypatch.setattr("builtins.input", fake_input)
    return prompts


def test_release_with_yes_prints_the_holder(routed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = answer(monkeypatch, None)
    machine_id, holder = live_lock(routed)
    token = holder.held_token(machine_id)
    out, _ = run("machine_memory_release", machine_id, "--yes")
    assert out.startswith(
        f"Released the lock on {machine_id!r} held by {holder.owner} (token {token}, acquired "
    )
    assert prompts == []
    assert holder.lock_info(machine_id) is None
    assert holder.extend(machine_id) is False
    out, _ = run("machine_memory_release", machine_id, "-y")
    assert out == f"Machine {machine_id!r} has no live lock: nothing to release.\n"


@pytest.mark.parametrize("reply", ["y", "yes", "Y"])
def test_release_asks_first(alias: str, monkeypatch: pytest.MonkeyPatch, reply: str) -> None:
    prompts = answer(monkeypatch, reply)
    machine_id, holder = live_lock(alias)
    out, _ = run("machine_memory_release", machine_id, "--database", alias)
    assert len(prompts) == 1 and holder.owner in prompts[0] and prompts[0].endswith("[y/N] ")
    assert out.startswith(f"Released the lock on {machine_id!r} held by {holder.owner}")
    assert holder.lock_info(machine_id) is None


@pytest.mark.parametrize("reply", ["", "n", "no thanks"])
def test_release_cancelled(alias: str, monkeypatch: pytest.MonkeyPatch, reply: str) -> None:
    answer(monkeypatch, reply)
    machine_id, holder = live_lock(alias)
    out, _ = run("machine_memory_release", machine_id, "--database", alias)
    assert out == "Cancelled: the lock was left alone.\n"
    info = holder.lock_info(machine_id)
    assert info is not None and info.owner == holder.owner
    assert holder.unlock(machine_id)


def test_release_without_a_terminal_needs_yes(alias: str, monkeypatch: pytest.MonkeyPatch) -> None:
    answer(monkeypatch, None)
    machine_id, holder = live_lock(alias)
    with pytest.raises(CommandError, match="pass --yes"):
        run("machine_memory_release", machine_id, "--database", alias)
    assert holder.lock_info(machine_id) is not None
    assert holder.unlock(machine_id)


def test_release_fails_with_a_command_error(alias: str) -> None:
    with pytest.raises(CommandError, match="Force-releasing the lock on 'm' failed"):
        run("machine_memory_release", "m", "--yes", "--database", settings.DOWN_DATABASES[alias])


def test_release_with_a_backend_that_cannot_force_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prompts = answer(monkeypatch, "y")
    # ExternalLocks says supports_force_release = False (the LockBackend default).
    backend = {"LOCK_BACKEND": "tests.test_commands.ExternalLocks"}
    with (
        override_settings(MACHINE_MEMORY=backend),
        pytest.raises(CommandError, match="ExternalLocks cannot force-release locks"),
    ):
        run("machine_memory_release", new_id())
    assert prompts == []


def test_release_of_an_unlocked_machine(alias: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = answer(monkeypatch, "y")
    out, _ = run("machine_memory_release", new_id(), "--database", alias)
    assert out.endswith("has no live lock: nothing to release.\n") and prompts == []


def test_commands_run_from_the_command_line() -> None:
    """Exit codes as a shell sees them: 2 for bad arguments, 1 for a CommandError.

    --skip-checks: since Django 6.0 the system checks connect to every database alias, and
    the test settings hold aliases of servers that are down on purpose.
    """
    import subprocess
    import sys

    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        code = "import sys; from django.core.management import execute_from_command_line; "
        code += "execute_from_command_line(['manage.py', *sys.argv[1:], '--skip-checks'])"
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=Path(__file__).resolve().parent.parent,
        )

    bad = manage("purge_expired_locks", "--batch-size", "0")
    assert bad.returncode == 2 and "must be at least 1, got 0" in bad.stderr
    failed = manage("machine_memory_inspect", "x" * 600)
    assert failed.returncode == 2 and "the limit is 512" in failed.stderr
    empty = manage("purge_machine_states")
    assert empty.returncode == 2 and "CommandError: Say which states" in empty.stderr
    old = manage("purge_expired_locks", "--older-than", "1e30")
    assert old.returncode == 2 and "from 0 to 3153600000 (100 years), got 1e30" in old.stderr
    backend = manage("machine_memory_bench", "--lock-backend", "nonsense")
    assert backend.returncode == 2, backend.stderr
    assert "choose database, redis, or the dotted path" in backend.stderr
    for command in ("purge_expired_locks", "purge_machine_states", "machine_memory_bench"):
        shown = manage(command, "--help")
        assert shown.returncode == 0
        # Every option with a value says what it is when left out.
        options = shown.stdout.split("\noptions:\n", 1)[1]
        valued = re.findall(r"^  (--[a-z-]+) [A-Z_]+", options, re.MULTILINE)
        assert {"--database", "--batch-size", "--cycles"} & set(valued), shown.stdout
        for option in valued:
            if option in {"--settings", "--pythonpath", "--http", "--token"}:
                continue  # Django's own, or needed only with another option
            block = options.split(f"\n  {option} ", 1)[1].split("\n  -", 1)[0]
            assert "Default" in block or "default" in block, (command, option, block)


def test_example_project_demo_admin_creates_a_superuser(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {
        k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL")
    }
    env["DEMO_SQLITE_PATH"] = str(tmp_path / "demo.sqlite3")

    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(root / "example_project" / "manage.py"), *args],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    created = manage("demo_admin")
    assert created.returncode == 0, created.stderr
    assert "Created the DEMO-ONLY superuser 'admin' with password 'admin'" in created.stdout
    again = manage("demo_admin", "--password", "other")
    assert again.returncode == 0 and "Reset the DEMO-ONLY superuser 'admin'" in again.stdout
    check = manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User; u = User.objects.get(username='admin');"
        " print(u.is_superuser, u.check_password('other'))",
    )
    assert check.stdout.strip().endswith("True True"), check.stdout + check.stderr
