"""The storage models on every database: metadata columns, QuerySet methods, exact ids."""

from __future__ import annotations

import datetime
import io
import os
import time
import unicodedata
from typing import TYPE_CHECKING, Any, cast

import pytest
from django.core.management import call_command
from django.db import connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from machine_memory import MachineMemory
from machine_memory.exceptions import InvalidState, LockLost
from machine_memory.models import MachineIdField, MachineLock, MachineState, StorageTime
from machine_memory.sql import dialect_for
from machine_memory.validation import MAX_STATE_DEPTH, METADATA_LENGTHS
from tests.support import new_id
from tests.test_clock import SKEWS, app_clock_moved

if TYPE_CHECKING:
    from collections.abc import Callable

    from django.db.models import QuerySet


def row(alias: str, machine_id: str) -> MachineState:
    return MachineState.objects.using(alias).get(machine_id=machine_id)


def ids(rows: QuerySet[Any]) -> set[str]:
    return set(rows.values_list("pk", flat=True))


def metadata_columns(alias: str, machine_id: str) -> tuple[Any, ...]:
    state = row(alias, machine_id)
    return (state.execution_status, state.parent_id, state.initiator, state.source)


def arvo_document(**extra: Any) -> dict[str, Any]:
    return {
        "executionStatus": "normal",
        "parentSubject": new_id("parent"),
        "initiator": "com.example.orchestrator",
        "source": "com.example.orders",
        "value": {"count": 1},
        **extra,
    }


# -- metadata columns ----------------------------------------------------------------------


def test_metadata_from_the_state_document(memory: MachineMemory, alias: str, mid: str) -> None:
    data = arvo_document(subject=mid)
    memory.write(mid, data, None)
    assert metadata_columns(alias, mid) == (
        "normal",
        data["parentSubject"],
        "com.example.orchestrator",
        "com.example.orders",
    )
    assert row(alias, mid).state == data


def test_metadata_follows_the_document_on_update(
    memory: MachineMemory, alias: str, mid: str
) -> None:
    memory.write(mid, arvo_document(), None)
    memory.write(mid, {"executionStatus": "done", "source": "s2"}, memory.read(mid))
    # Keys the new document no longer has are cleared: the columns describe this state.
    assert metadata_columns(alias, mid) == ("done", None, None, "s2")


def test_metadata_absent_everywhere(memory: MachineMemory, alias: str, mid: str) -> None:
    memory.write(mid, {"plain": True, "executionStatus": 3}, None)
    assert metadata_columns(alias, mid) == (None, None, None, None)


def test_explicit_metadata_overrides_the_document(
    memory: MachineMemory, alias: str, mid: str
) -> None:
    parent = new_id("parent")
    metadata = {
        "subject": mid,
        "parent_subject": parent,
        "initiator": "explicit-initiator",
        "source": "explicit-source",
    }
    memory.write(mid, arvo_document(), None, metadata=metadata)
    assert metadata_columns(alias, mid) == (
        "normal",
        parent,
        "explicit-initiator",
        "explicit-source",
    )


def test_partial_metadata_and_explicit_none(memory: MachineMemory, alias: str, mid: str) -> None:
    data = arvo_document()
    memory.write(mid, data, None, metadata={"source": "only-source", "parent_subject": None})
    assert metadata_columns(alias, mid) == (
        "normal",
        None,
        "com.example.orchestrator",
        "only-source",
    )


def test_long_document_values_are_cut_to_the_columns(
    memory: MachineMemory, alias: str, mid: str
) -> None:
    # The document itself is stored whole; only the indexed copies are cut (MariaDB would
    # refuse an over-long value in strict mode).
    data = {
        "executionStatus": "é" * 1000,
        "parentSubject": "p" * 1000,
        "initiator": "i" * 1000,
        "source": "🚀" * 1000,
    }
    memory.write(mid, data, None)
    assert metadata_columns(alias, mid) == (
        "é" * METADATA_LENGTHS["execution_status"],
        "p" * METADATA_LENGTHS["parent_id"],
        "i" * METADATA_LENGTHS["initiator"],
        "🚀" * METADATA_LENGTHS["source"],
    )
    assert memory.read(mid) == data


def test_metadata_at_the_column_limits(memory: MachineMemory, alias: str, mid: str) -> None:
    metadata = {
        "parent_subject": "ü" * METADATA_LENGTHS["parent_id"],
        "initiator": "状" * METADATA_LENGTHS["initiator"],
        "source": "🚀" * METADATA_LENGTHS["source"],
    }
    memory.write(mid, {"executionStatus": "é" * 64}, None, metadata=metadata)
    assert metadata_columns(alias, mid) == (
        "é" * 64,
        metadata["parent_subject"],
        metadata["initiator"],
        metadata["source"],
    )


BAD_METADATA: list[Any] = [
    ["subject"],
    "not a mapping",
    {"parentSubject": "document spelling"},
    {"execution_status": "done"},
    {"source": 1},
    {"initiator": b"bytes"},
    {"parent_subject": ["p"]},
    {"subject": "another-machine"},
    {"initiator": "i" * (METADATA_LENGTHS["initiator"] + 1)},
    {"source": "s" * (METADATA_LENGTHS["source"] + 1)},
    {"parent_subject": "p" * (METADATA_LENGTHS["parent_id"] + 1)},
]


@pytest.mark.parametrize("metadata", BAD_METADATA, ids=lambda metadata: repr(metadata)[:30])
def test_bad_metadata_writes_nothing(
    memory: MachineMemory, alias: str, mid: str, metadata: Any
) -> None:
    with pytest.raises(InvalidState):
        memory.write(mid, {"n": 1}, None, metadata=metadata)
    assert not MachineState.objects.using(alias).filter(machine_id=mid).exists()

    memory.write(mid, {"n": 1, "source": "first"}, None)
    before = row(alias, mid)
    with pytest.raises(InvalidState):
        memory.write(mid, {"n": 2}, memory.read(mid), metadata=metadata)
    after = row(alias, mid)
    assert (after.state, after.version, after.source, after.updated_at) == (
        before.state,
        before.version,
        before.source,
        before.updated_at,
    )


# -- version, fence, timestamps ------------------------------------------------------------


def test_version_increments_and_fence_stays_zero_with_database_locks(
    memory: MachineMemory, alias: str, mid: str
) -> None:
    assert memory.lock(mid)
    memory.write(mid, {"n": 0}, None)
    assert (row(alias, mid).version, row(alias, mid).fence) == (1, 0)
    for n in range(1, 5):
        memory.write(mid, {"n": n}, memory.read(mid))
        assert (row(alias, mid).version, row(alias, mid).fence) == (n + 1, 0)
    assert memory.unlock(mid)
    # Unlocked writes are version-checked the same way.
    memory.write(mid, {"n": 5}, memory.read(mid))
    assert (row(alias, mid).version, row(alias, mid).fence) == (6, 0)


def test_rejected_write_leaves_the_version(memory: MachineMemory, alias: str, mid: str) -> None:
    memory.write(mid, {"n": 1}, None)
    stale = memory.read(mid)
    memory.write(mid, {"n": 2}, memory.read(mid))
    with pytest.raises(Exception, match="version"):
        memory.write(mid, {"n": 3}, stale)
    assert row(alias, mid).version == 2
    assert row(alias, mid).state == {"n": 2}


def test_timestamps(memory: MachineMemory, alias: str, mid: str) -> None:
    memory.write(mid, {"n": 1}, None)
    created = row(alias, mid)
    assert created.created_at is not None and created.updated_at is not None
    assert timezone.is_aware(created.created_at)
    assert created.created_at == created.updated_at
    # The database's clock, on the machine that runs these tests: close to ours.
    assert abs(created.created_at - timezone.now()) < datetime.timedelta(minutes=5)

    time.sleep(0.02)  # SQLite keeps milliseconds
    memory.write(mid, {"n": 2}, memory.read(mid))
    updated = row(alias, mid)
    assert updated.created_at == created.created_at
    assert updated.updated_at > created.updated_at


# -- deep documents ------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [32, 33, 100, MAX_STATE_DEPTH])
def test_deeply_nested_state_round_trips(
    memory: MachineMemory, alias: str, mid: str, depth: int
) -> None:
    # Any depth up to MAX_STATE_DEPTH (docs/contract.md#states): MariaDB's JSON_VALID()
    # refuses more than 32 levels before 12.2, so the state column must not carry that CHECK.
    nested: dict[str, Any] = {"leaf": True}
    for _ in range(depth - 1):
        nested = {"d": nested}
    memory.write(mid, nested, None)
    assert memory.read(mid) == nested
    assert row(alias, mid).state == nested


def test_state_deeper_than_the_limit_is_refused_and_nothing_is_stored(
    memory: MachineMemory, alias: str, mid: str
) -> None:
    nested: dict[str, Any] = {"leaf": [1]}
    for _ in range(MAX_STATE_DEPTH - 1):
        nested = {"d": nested}
    with pytest.raises(InvalidState, match=f"more than {MAX_STATE_DEPTH} levels"):
        memory.write(mid, nested, None)
    assert not MachineState.objects.using(alias).filter(machine_id=mid).exists()


# -- QuerySet methods ----------------------------------------------------------------------


def test_lock_queryset_live_and_expired(alias: str) -> None:
    memory = MachineMemory(using=alias, lock_retries=0)
    live, released, lapsed = new_id("live"), new_id("released"), new_id("lapsed")
    assert memory.lock(live, ttl=60)
    assert memory.lock(released, ttl=60)
    assert memory.unlock(released)
    assert memory.lock(lapsed, ttl=0.05)
    ids = [live, released, lapsed]
    time.sleep(0.15)
    locks = MachineLock.objects.using(alias).filter(machine_id__in=ids)
    assert set(locks.live().values_list("machine_id", flat=True)) == {live}
    assert set(locks.expired().values_list("machine_id", flat=True)) == {released, lapsed}
    # The rows are still there (a release keeps the token history), with owner and token.
    assert set(locks.values_list("owner", flat=True)) == {memory.owner}
    assert memory.unlock(live)
    assert set(locks.expired().values_list("machine_id", flat=True)) == set(ids)


@SKEWS
def test_lock_queryset_uses_the_database_clock(alias: str, skew: float) -> None:
    # live(), expired() and everything built on them compare expires_at with the database's
    # clock inside the SQL. With the application's clock an hour ahead, a comparison with
    # timezone.now() would call a lock with a minute left expired (and purge it); an hour
    # behind, it would call a lock that expired a minute ago live (and never purge it).
    memory = MachineMemory(using=alias)
    expired, live = new_id("expired"), new_id("live")
    for machine_id in (expired, live):
        memory.write(machine_id, {"id": machine_id}, None)
    assert memory.lock(expired)
    assert memory.unlock(expired)
    locks = MachineLock.objects.using(alias).filter(machine_id__in=[expired, live])
    locks.filter(pk=expired).update(expires_at=StorageTime(-60))
    # Locked last, so on SQLite the token high-water row is this live one, not `expired`.
    assert memory.lock(live, ttl=60)
    states = MachineState.objects.using(alias).filter(machine_id__in=[expired, live])
    with app_clock_moved(skew):
        assert ids(locks.live()) == {live}
        assert ids(locks.expired()) == {expired}
        assert ids(locks.expired(older_than=30)) == {expired}
        assert ids(locks.expired(older_than=120)) == set()
        assert ids(locks.purgeable()) == {expired}
        assert ids(states.with_live_lock()) == {live}
        assert ids(states.with_expired_lock()) == {expired}
        assert ids(states.without_live_lock()) == {expired}
        assert ids(states.purgeable(older_than=0)) == {expired}
        # lock_live is an annotation, which django-stubs cannot see.
        lock_live = dict(states.with_lock().values_list("pk", "lock_live"))  # type: ignore[misc]
        assert lock_live == {expired: False, live: True}
        assert locks.purge_expired().deleted == 1
        assert ids(locks) == {live}
        info = memory.lock_info(live)
        assert info is not None and info.owner == memory.owner
    assert memory.unlock(live)


def test_purgeable_keeps_the_highest_token(alias: str) -> None:
    memory = MachineMemory(using=alias)
    first, second, live = new_id("first"), new_id("second"), new_id("live")
    assert memory.lock(live, ttl=60)
    assert memory.lock(first)
    assert memory.unlock(first)
    assert memory.lock(second)
    assert memory.unlock(second)
    ids = [first, second, live]
    locks = MachineLock.objects.using(alias)
    tokens = dict(locks.filter(machine_id__in=ids).values_list("machine_id", "token"))
    assert tokens[live] < tokens[first] < tokens[second]
    top = max(locks.values_list("token", flat=True))
    assert top == tokens[second]

    purgeable = set(
        locks.purgeable().filter(machine_id__in=ids).values_list("machine_id", flat=True)
    )
    if not dialect_for(connections[alias]).token_high_water_row:
        # Tokens come from a sequence: every expired lock may go, never a live one.
        assert purgeable == {first, second}
        assert memory.unlock(live)
        return
    # Expired and not the high-water mark; never a live lock.
    assert purgeable == {first}
    assert not locks.purgeable().filter(token=top).exists()
    deleted, _ = locks.purgeable().filter(machine_id__in=ids).delete()
    assert deleted == 1
    assert set(locks.filter(machine_id__in=ids).values_list("machine_id", flat=True)) == {
        second,
        live,
    }
    assert memory.unlock(live)


def test_purgeable_is_empty_when_only_the_top_row_expired(alias: str) -> None:
    memory = MachineMemory(using=alias)
    machine_id = new_id()
    assert memory.lock(machine_id)
    assert memory.unlock(machine_id)
    locks = MachineLock.objects.using(alias)
    assert locks.filter(machine_id=machine_id).expired().exists()
    kept = dialect_for(connections[alias]).token_high_water_row
    assert locks.purgeable().filter(machine_id=machine_id).exists() is not kept


def test_fencing_tokens_increase_across_purges(alias: str) -> None:
    memory = MachineMemory(using=alias)
    machine_id, other = new_id(), new_id("other")
    tokens = []
    for _ in range(3):
        assert memory.lock(machine_id)
        info = memory.lock_info(machine_id)
        assert info is not None
        tokens.append(info.token)
        assert memory.unlock(machine_id)
        # A later acquisition elsewhere, so that this row is no longer the high-water mark.
        assert memory.lock(other)
        assert memory.unlock(other)
        locks = MachineLock.objects.using(alias)
        locks.purgeable().filter(machine_id__in=[machine_id, other]).delete()
        assert not locks.filter(machine_id=machine_id).exists()
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)
    # And a token handed out after the purge is above every token ever seen for the id.
    assert memory.lock(machine_id)
    info = memory.lock_info(machine_id)
    assert info is not None and info.token > max(tokens)
    assert memory.unlock(machine_id)


def test_old_holder_is_fenced_after_a_purge(alias: str) -> None:
    # A holder whose lock row was taken over, released and purged must not write.
    holder = MachineMemory(using=alias)
    machine_id, other = new_id(), new_id("other")
    holder.write(machine_id, {"n": 0}, None)
    assert holder.lock(machine_id, ttl=0.05)
    state = holder.read(machine_id)
    time.sleep(0.1)
    thief = MachineMemory(using=alias)
    assert thief.lock(machine_id)
    assert thief.unlock(machine_id)
    assert thief.lock(other)
    assert thief.unlock(other)
    MachineLock.objects.using(alias).purgeable().filter(machine_id__in=[machine_id, other]).delete()
    assert not MachineLock.objects.using(alias).filter(machine_id=machine_id).exists()
    with pytest.raises(LockLost):
        holder.write(machine_id, {"n": 1}, state)
    assert row(alias, machine_id).state == {"n": 0}
    # Also when the state has moved on meanwhile (the version no longer tells a takeover
    # from a plain conflict: the missing lock row does).
    thief.write(machine_id, {"n": 5}, thief.read(machine_id))
    with pytest.raises(LockLost) as raised:
        holder.write(machine_id, {"n": 1}, state)
    assert (raised.value.expected_version, raised.value.actual_version) == (1, 2)
    assert row(alias, machine_id).state == {"n": 5}


# How long a lock lives that a test lets lapse.
SHORT_TTL = 0.3


def lapse() -> None:
    time.sleep(SHORT_TTL + 0.1)


def assert_stale_holders_stay_fenced(
    memories: tuple[MachineMemory, MachineMemory, MachineMemory],
    machine_id: str,
    purges: tuple[Callable[[], None], Callable[[], None]],
    via: str,
) -> None:
    """A lock taken again after its trace was purged gets a token above every earlier one.

    A stale holder's write is stopped only because the lock's current token is not its own:
    a token handed out again (a counter rebuilt from the rows the purge left, a sequence
    read wrong, a takeover that keeps the old token) would let that holder write as if it
    had never lost the lock. ``purges`` remove what the lock backend keeps of a lock that
    is over (expired lock rows, a token counter); each also checks that the trace is gone.
    ``via``: "lock" or "lock_and_read", which take the lock with statements of their own.
    """
    first, second, third = memories
    first.write(machine_id, {"n": 0}, None)
    tokens: list[int] = []

    def take(memory: MachineMemory, ttl: float) -> None:
        if via == "lock_and_read":
            taken = memory.lock_and_read(machine_id, ttl=ttl)
            assert taken is not None and taken.state == memory.read(machine_id)
        else:
            assert memory.lock(machine_id, ttl=ttl)
        token = memory.held_token(machine_id)
        assert token is not None
        # Strictly above every token handed out for the id before.
        assert all(token > earlier for earlier in tokens), (token, tokens)
        tokens.append(token)
        info = memory.lock_info(machine_id)
        assert info is not None and (info.owner, info.token) == (memory.owner, token)

    def assert_fenced(stale: MachineMemory) -> None:
        # prev_data read just now, so that only the fence can refuse the write.
        with pytest.raises(LockLost):
            stale.write(machine_id, {"n": "stale"}, stale.read(machine_id))

    # The first holder's lock lapses; the second takes it over and releases it.
    take(first, SHORT_TTL)
    lapse()
    take(second, SHORT_TTL)
    assert_fenced(first)
    assert second.unlock(machine_id)
    purges[0]()
    # The third takes it anew: the first holder must not be able to write.
    take(third, SHORT_TTL)
    assert_fenced(first)
    # The third holder's lock lapses without a release, is purged, and the second locks again.
    lapse()
    purges[1]()
    take(second, 60)
    assert_fenced(first)
    assert_fenced(third)
    assert second.read(machine_id) == {"n": 0}
    second.write(machine_id, {"n": 1}, second.read(machine_id))
    assert second.unlock(machine_id)
    assert first.read(machine_id) == {"n": 1}


@pytest.mark.parametrize("via", ["lock", "lock_and_read"])
def test_a_lock_taken_again_after_a_purge_never_reuses_a_token(
    alias: str, mid: str, via: str
) -> None:
    locks = MachineLock.objects.using(alias)
    memories = (MachineMemory(using=alias), MachineMemory(using=alias), MachineMemory(using=alias))

    def purge(by_command: bool) -> Callable[[], None]:
        def run() -> None:
            if dialect_for(connections[alias]).token_high_water_row:
                # SQLite derives the next token from the highest one in the table, so its
                # purge keeps that row: a lock taken elsewhere moves the high-water mark off
                # ours. Only there: elsewhere the next token must follow ours directly.
                other = new_id("other")
                assert memories[0].lock(other)
                assert memories[0].unlock(other)
            if by_command:
                call_command("purge_expired_locks", "--database", alias, stdout=io.StringIO())
            else:
                locks.purge_expired()
            assert not locks.filter(machine_id=mid).exists()

        return run

    assert_stale_holders_stay_fenced(memories, mid, (purge(True), purge(False)), via)


def test_tokens_are_indexed_only_where_the_next_one_comes_from_the_highest(alias: str) -> None:
    """SQLite derives each token from MAX(token) and needs the index; a sequence does not,
    and an index there would cost every lock and release an entry (migration 0002)."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, "machine_memory_lock")
    indexed = [
        name for name, c in constraints.items() if c["index"] and c["columns"][:1] == ["token"]
    ]
    assert bool(indexed) == dialect_for(connection).token_high_water_row, constraints
    expires = [c for c in constraints.values() if c["index"] and c["columns"] == ["expires_at"]]
    assert expires, constraints  # purges and the admin's filter find expired locks by it


def test_distinct_values_gives_at_most_the_limit_in_order(
    memory: MachineMemory, alias: str
) -> None:
    status = new_id("status")
    ids = [new_id() for _ in range(5)]
    for machine_id, suffix in zip(ids, ["c", "a", "b", "a", "d"], strict=True):
        memory.write(machine_id, {"executionStatus": f"{status}-{suffix}"}, None)
    memory.write(new_id(), {}, None)  # no status: NULL, never a value
    ours = MachineState.objects.using(alias).filter(machine_id__in=ids)
    spelled = [f"{status}-{suffix}" for suffix in "abcd"]
    for limit in range(6):
        assert ours.distinct_values("execution_status", limit) == spelled[:limit]


def test_state_queryset_with_status_and_children_of(memory: MachineMemory, alias: str) -> None:
    status, parent, other_parent = new_id("status"), new_id("parent"), new_id("parent")
    children = [new_id("child") for _ in range(3)]
    for child in children:
        memory.write(child, {"executionStatus": status, "parentSubject": parent}, None)
    stranger = new_id("stranger")
    memory.write(stranger, {"executionStatus": "other", "parentSubject": other_parent}, None)
    by_metadata = new_id("meta")
    memory.write(by_metadata, {}, None, metadata={"parent_subject": parent})

    states = MachineState.objects.using(alias)
    assert set(states.with_status(status).values_list("machine_id", flat=True)) == set(children)
    assert set(states.children_of(parent).values_list("machine_id", flat=True)) == {
        *children,
        by_metadata,
    }
    assert list(states.children_of(other_parent).values_list("machine_id", flat=True)) == [stranger]
    assert set(
        states.children_of(parent).with_status(status).values_list("machine_id", flat=True)
    ) == set(children)
    # Parents are machine ids, so they match exactly, like the ids themselves. (Statuses are
    # plain text columns and follow the database's default collation.)
    assert not states.children_of(parent.upper()).exists()
    assert not states.children_of(parent + " ").exists()


# -- ids compare exactly -------------------------------------------------------------------


def id_variants(base: str) -> list[str]:
    return [
        base + "-cafe",
        (base + "-cafe").upper(),
        base + "-cafe ",
        base + "-cafe  ",
        base + "-café",  # precomposed é (NFC)
        unicodedata.normalize("NFD", base + "-café"),  # e + combining acute (NFD)
        base + "-CAFÉ",
        base + "-caf\u00e8",  # è
    ]


def test_ids_that_differ_in_case_spaces_or_accents_are_distinct(
    memory: MachineMemory, alias: str
) -> None:
    variants = id_variants(new_id())
    assert len(set(variants)) == len(variants)
    for n, machine_id in enumerate(variants):
        memory.write(machine_id, {"n": n, "id": machine_id}, None)
    for n, machine_id in enumerate(variants):
        assert memory.read(machine_id) == {"n": n, "id": machine_id}
        # The ORM sees the same: one row per id, with the id as written.
        rows = list(MachineState.objects.using(alias).filter(machine_id=machine_id))
        assert len(rows) == 1
        assert rows[0].machine_id == machine_id
        assert rows[0].state == {"n": n, "id": machine_id}
    assert MachineState.objects.using(alias).filter(machine_id__in=variants).count() == len(
        variants
    )


def test_on_mysql_the_vendor_module_picks_mysqls_types_and_refuses_database_locks() -> None:
    """What sql/mysql.py chooses on a MySQL server (not MariaDB): its binary collation, its
    own JSON type, no routines to install, and database locks refused with the fix named.
    There is no MySQL server here, so a stand-in for Django's connection and the driver's
    carries the two facts the module reads: ``mysql_is_mariadb`` and the server version."""
    from types import SimpleNamespace

    from machine_memory.exceptions import MachineMemoryError
    from machine_memory.sql.mysql import MySQLDialect

    dialect = MySQLDialect()
    mysql = cast("Any", SimpleNamespace(mysql_is_mariadb=False))
    mariadb = cast("Any", SimpleNamespace(mysql_is_mariadb=True))
    assert (dialect.id_collation(mysql), dialect.id_collation(mariadb)) == (
        "utf8mb4_0900_bin",
        "utf8mb4_nopad_bin",
    )
    assert (dialect.state_db_type(mysql), dialect.state_db_type(mariadb)) == (None, "longtext")
    executed: list[str] = []
    editor = cast("Any", SimpleNamespace(connection=mysql, execute=executed.append))
    dialect.install(editor)
    dialect.uninstall(editor)
    assert executed == []  # no sequence, no procedures on MySQL
    server = SimpleNamespace(get_server_info=lambda: "8.4.3")
    cursor = cast("Any", SimpleNamespace(connection=server))
    for take in (dialect.acquire, dialect.acquire_and_read):
        with pytest.raises(MachineMemoryError) as raised:
            take(cursor, "m", "owner", 30.0)
        assert str(raised.value) == (
            "Database locks on MySQL need sequences, which only MariaDB has; use MariaDB or a "
            "Redis lock backend."
        )


@pytest.mark.parametrize("alias", ["mariadb"], indirect=True)
def test_on_mysql_id_columns_get_mysqls_binary_collation(alias: str) -> None:
    """The id field asks the vendor module about the connection it is given. No MySQL
    server here: the MariaDB connection, told it is not MariaDB (what Django's
    ``mysql_is_mariadb`` says on MySQL), stands in for one."""
    from machine_memory.models import MachineIdField

    connection: Any = connections[alias]
    field = MachineIdField(max_length=255)
    assert field.db_parameters(connection)["collation"] == "utf8mb4_nopad_bin"
    connection.__dict__["mysql_is_mariadb"] = False  # a cached_property of Django's
    try:
        assert field.db_parameters(connection)["collation"] == "utf8mb4_0900_bin"
    finally:
        del connection.__dict__["mysql_is_mariadb"]
    assert connection.mysql_is_mariadb  # computed again from the server
    # A collation the field is given wins over the vendor's.
    given = MachineIdField(max_length=255, db_collation="utf8mb4_general_ci")
    assert given.db_parameters(connection)["collation"] == "utf8mb4_general_ci"


def test_the_columns_this_code_makes_keep_ids_and_deep_states_apart(alias: str) -> None:
    """A table made now from the app's own fields (MachineIdField, StateField), beside the
    migrated ones: ids differing in case, accents or trailing spaces are distinct rows and
    lookups, and a state nested to the depth limit is stored whole. The fields' column
    types and collation come from the vendor module at the time the table is made."""
    from django.db import models
    from django.test.utils import isolate_apps

    from machine_memory.models import MachineIdField, StateField

    connection = connections[alias]
    with isolate_apps("machine_memory"):

        class Probe(models.Model):
            machine_id = MachineIdField(primary_key=True)
            state = StateField()
            parent_id = MachineIdField(null=True)

            class Meta:
                app_label = "machine_memory"
                db_table = f"machine_memory_probe_{os.getpid()}"

            def __str__(self) -> str:
                return str(self.machine_id)

        with connection.schema_editor() as editor:
            editor.create_model(Probe)
        try:
            rows = Probe._default_manager.using(alias)
            variants = id_variants(new_id())
            deep: dict[str, Any] = {"leaf": True}
            for _ in range(MAX_STATE_DEPTH - 1):
                deep = {"d": deep}
            for n, machine_id in enumerate(variants):
                rows.create(
                    machine_id=machine_id, state={"n": n, "deep": deep}, parent_id=machine_id
                )
            for n, machine_id in enumerate(variants):
                (row,) = rows.filter(machine_id=machine_id)
                assert row.machine_id == machine_id
                assert row.state == {"n": n, "deep": deep}
                assert [r.machine_id for r in rows.filter(parent_id=machine_id)] == [machine_id]
        finally:
            with connection.schema_editor() as editor:
                editor.delete_model(Probe)


def test_distinct_ids_get_distinct_locks(alias: str) -> None:
    first = MachineMemory(using=alias, lock_retries=0)
    second = MachineMemory(using=alias, lock_retries=0)
    variants = id_variants(new_id())
    for machine_id in variants:
        assert first.lock(machine_id)
        assert not second.lock(machine_id)
    locks = MachineLock.objects.using(alias).filter(machine_id__in=variants)
    assert locks.live().count() == len(variants)
    for machine_id in variants:
        assert first.unlock(machine_id)
        assert MachineLock.objects.using(alias).get(machine_id=machine_id).machine_id == machine_id


def test_update_of_one_variant_leaves_the_others(memory: MachineMemory, alias: str) -> None:
    base = new_id()
    lower, upper, spaced = base + "-x", (base + "-x").upper(), base + "-x "
    for machine_id in (lower, upper, spaced):
        memory.write(machine_id, {"id": machine_id}, None)
    memory.write(upper, {"id": upper, "changed": True}, memory.read(upper))
    assert row(alias, lower).version == 1
    assert row(alias, spaced).version == 1
    assert row(alias, upper).version == 2
    memory.cleanup_mode = "delete"
    memory.cleanup(spaced, memory.read(spaced), None)
    assert set(
        MachineState.objects.using(alias)
        .filter(machine_id__in=[lower, upper, spaced])
        .values_list("machine_id", flat=True)
    ) == {lower, upper}


def test_the_id_field_takes_django_fields_arguments() -> None:
    # As any Django field: the verbose name may come first, positionally; the length is the
    # id limit unless given.
    field = MachineIdField("workflow", primary_key=True)
    assert (field.verbose_name, field.primary_key, field.max_length) == ("workflow", True, 512)
    assert MachineIdField(max_length=64).max_length == 64


def test_summaries_leave_the_state_document_behind(alias: str, mid: str) -> None:
    # Listings (the API's GET states/) read every column but the document, which may be a
    # megabyte; the document is read only for a row that asks for it.
    MachineMemory(using=alias).write(mid, {"big": "x" * 1000}, None)
    connection = connections[alias]
    with CaptureQueriesContext(connection) as listed:
        (row,) = MachineState.objects.using(alias).filter(pk=mid).summaries()
        assert row.version == 1
    [listing] = [query["sql"] for query in listed.captured_queries]
    quote = connection.ops.quote_name
    assert quote("version") in listing and quote("state") not in listing, listing
    with CaptureQueriesContext(connection) as loaded:
        assert row.state == {"big": "x" * 1000}
    assert len(loaded.captured_queries) == 1


@pytest.mark.usefixtures("db_access")
def test_purge_keeps_the_high_water_row_of_its_own_sqlite_database() -> None:
    """On SQLite the row with the highest token is kept; "highest" is that of the database
    being purged, not of another database the project also has."""
    from tests.test_migrations import new_database

    busy = MachineMemory(using="default")
    for machine_id in [new_id() for _ in range(3)]:  # the default's highest token is now >= 3
        assert busy.lock(machine_id) and busy.unlock(machine_id)
    with new_database("default") as other:
        call_command("migrate", "machine_memory", database=other, verbosity=0)
        memory = MachineMemory(using=other)
        assert memory.lock("first", ttl=0.05) and memory.lock("second", ttl=0.05)
        assert memory.held_token("second") == 2
        time.sleep(0.1)
        purged = MachineLock.objects.using(other).purge_expired()
        assert (purged.deleted, purged.batches) == (1, 1)
        assert list(MachineLock.objects.using(other).values_list("machine_id", flat=True)) == [
            "second"
        ]
        memory.close()


def test_purge_expired_takes_a_thousand_rows_a_batch_by_default(alias: str) -> None:
    holder, top = MachineMemory(using=alias), new_id()
    assert holder.lock(top)  # on SQLite, the high-water row: live, and above the rows below
    prefix = new_id("gone")
    past = timezone.now() - datetime.timedelta(hours=1)
    MachineLock.objects.using(alias).bulk_create(
        MachineLock(
            machine_id=f"{prefix}-{n:04}", owner="gone", token=1, acquired_at=past, expires_at=past
        )
        for n in range(1001)
    )
    gone = MachineLock.objects.using(alias).filter(machine_id__startswith=prefix)
    purged = gone.purge_expired()
    assert (purged.deleted, purged.batches) == (1001, 2)
    assert holder.unlock(top)


def test_rows_are_shown_by_their_machine_id() -> None:
    # The admin's headings, its delete confirmation and its action messages show rows so.
    assert str(MachineState(machine_id="order-7")) == "order-7"
    assert str(MachineLock(machine_id="order-7", owner="w", token=3)) == "order-7"
